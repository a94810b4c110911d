//! Classifying a kernel's parameters by their types.

use quote::ToTokens;
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::{FnArg, GenericArgument, Pat, PathArguments, Signature, Type};

pub enum ParamRole {
    /// A ref bound from the trace: `kind` is the `ParamKind` variant, `wrapper` the dsl type.
    Ref { kind: &'static str, wrapper: syn::Ident, elem: Type, mutable: bool },
    /// A plain Rust value fixed at trace time.
    Comptime { ty: Type },
}

pub struct Param {
    pub ident: syn::Ident,
    pub role: ParamRole,
}

/// A type as the user wrote it (token streams print as `& Vec < f32 >`).
fn spelled(ty: &Type) -> String {
    ty.to_token_stream().to_string().replace("& ", "&").replace(" < ", "<").replace(" >", ">").replace(" ,", ",")
}

const EXPECTED: &str = "a kernel parameter is `&Ref<T>` (input block), `&mut Ref<T>` (output block), `&mut Scratch<T>` (scratch), `&Prefetch<T>` (scalar prefetch), or a compile-time value taken by value";

/// `Wrapper<T>` → ("Wrapper", T).
fn ref_wrapper(ty: &Type) -> Option<(syn::Ident, Type)> {
    let Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    let PathArguments::AngleBracketed(args) = &seg.arguments else { return None };
    if args.args.len() != 1 {
        return None;
    }
    match args.args.first()? {
        GenericArgument::Type(t) => Some((seg.ident.clone(), t.clone())),
        _ => None,
    }
}

pub fn classify(sig: &Signature) -> syn::Result<Vec<Param>> {
    let mut out = Vec::new();
    for arg in &sig.inputs {
        let FnArg::Typed(pt) = arg else {
            return Err(syn::Error::new(arg.span(), "a kernel is a free function; it cannot take `self`"));
        };
        let Pat::Ident(pi) = &*pt.pat else {
            return Err(syn::Error::new(pt.pat.span(), "name each kernel parameter with a plain identifier"));
        };
        let ident = pi.ident.clone();
        let role = match &*pt.ty {
            Type::Reference(r) => {
                let mutable = r.mutability.is_some();
                let Some((wrapper, elem)) = ref_wrapper(&r.elem) else {
                    return Err(syn::Error::new(pt.ty.span(), format!("unsupported kernel parameter type `{}`: {EXPECTED}", spelled(&pt.ty))));
                };
                let kind = match (wrapper.to_string().as_str(), mutable) {
                    ("Ref", false) => "Input",
                    ("Ref", true) => "Output",
                    ("Scratch", true) => "Scratch",
                    ("Prefetch", false) => "Prefetch",
                    ("Scratch", false) => return Err(syn::Error::new(pt.ty.span(), "scratch is written by the kernel: declare it `&mut Scratch<T>`")),
                    ("Prefetch", true) => return Err(syn::Error::new(pt.ty.span(), "scalar-prefetch tables are read-only: declare it `&Prefetch<T>`")),
                    _ => return Err(syn::Error::new(pt.ty.span(), format!("unsupported kernel parameter type `{}`: {EXPECTED}", spelled(&pt.ty)))),
                };
                ParamRole::Ref { kind, wrapper, elem, mutable }
            }
            Type::ImplTrait(_) | Type::TraitObject(_) | Type::Ptr(_) => {
                return Err(syn::Error::new(pt.ty.span(), format!("unsupported kernel parameter type `{}`: {EXPECTED}", spelled(&pt.ty))));
            }
            other => ParamRole::Comptime { ty: other.clone() },
        };
        out.push(Param { ident, role });
    }
    Ok(out)
}

/// Reports `x.store(..)` on an input ref with a message that says how to fix it.
pub fn reject_input_stores(params: &[Param], body: &syn::Block) -> syn::Result<()> {
    struct Finder<'a> {
        readonly: Vec<(&'a syn::Ident, &'static str)>,
        err: Option<syn::Error>,
    }
    impl<'ast> Visit<'ast> for Finder<'_> {
        fn visit_expr_method_call(&mut self, m: &'ast syn::ExprMethodCall) {
            let writes = ["store", "store_at", "set"];
            if let syn::Expr::Path(p) = &*m.receiver {
                if let Some(id) = p.path.get_ident() {
                    if let Some((_, what)) = self.readonly.iter().find(|(r, _)| *r == id) {
                        if writes.contains(&m.method.to_string().as_str()) && self.err.is_none() {
                            let msg = format!(
                                "cannot store into `{id}`: it is {what}, declared `&{}<T>`; declare it `&mut Ref<T>` to make it an output",
                                if *what == "an input" { "Ref" } else { "Prefetch" }
                            );
                            self.err = Some(syn::Error::new(m.method.span(), msg));
                        }
                    }
                }
            }
            syn::visit::visit_expr_method_call(self, m);
        }
    }
    let readonly = params
        .iter()
        .filter_map(|p| match &p.role {
            ParamRole::Ref { kind: "Input", .. } => Some((&p.ident, "an input")),
            ParamRole::Ref { kind: "Prefetch", .. } => Some((&p.ident, "a scalar-prefetch table")),
            _ => None,
        })
        .collect();
    let mut f = Finder { readonly, err: None };
    f.visit_block(body);
    f.err.map_or(Ok(()), Err)
}
