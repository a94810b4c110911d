//! `#[tpu_kernel]`: turns a plain Rust function into a traceable torchtpu kernel.
//!
//! The function keeps its name and body, rewritten so that it traces: comparisons, `&&`
//! and `||` go through `torchtpu_dsl::trace::control`, every `if` becomes an if-scope and
//! every `for` over `a..b` a for-scope, whose types decide at compile time whether they stay
//! plain Rust (conditions and bounds known at trace time) or become IR regions (traced
//! ones). Variables assigned inside such a region are handed to the scope so a traced
//! region can carry them. Beside the function, a type of the same name gets
//! `kernel(compile-time args...) -> KernelDef`.

mod rewrite;
mod signature;

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit_mut::VisitMut;
use syn::{parse_macro_input, ItemFn};

use crate::signature::{classify, Param, ParamRole};

/// The path under which the macro's output reaches the kernel language.
fn dsl_path() -> TokenStream2 {
    use proc_macro_crate::{crate_name, FoundCrate};
    match crate_name("torchtpu-dsl") {
        Ok(FoundCrate::Itself) => quote!(::torchtpu_dsl),
        Ok(FoundCrate::Name(n)) => {
            let id = syn::Ident::new(&n, Span::call_site());
            quote!(::#id)
        }
        Err(_) => match crate_name("torchtpu") {
            Ok(FoundCrate::Name(n)) => {
                let id = syn::Ident::new(&n, Span::call_site());
                quote!(::#id::dsl)
            }
            _ => quote!(::torchtpu::dsl),
        },
    }
}

#[proc_macro_attribute]
pub fn tpu_kernel(attr: TokenStream, item: TokenStream) -> TokenStream {
    let attr = TokenStream2::from(attr);
    if !attr.is_empty() {
        return syn::Error::new(attr.span(), "#[tpu_kernel] takes no arguments").to_compile_error().into();
    }
    let func = parse_macro_input!(item as ItemFn);
    match expand(func) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// `#[tpu_fn]`: a helper that kernels call, written by the same rules as a kernel body
/// (comparisons, `&&`, `||`, `if` and `for` trace or stay Rust by their types). It takes and
/// returns refs, traced values and Rust values freely; the ops it emits carry its own lines.
#[proc_macro_attribute]
pub fn tpu_fn(attr: TokenStream, item: TokenStream) -> TokenStream {
    let attr = TokenStream2::from(attr);
    if !attr.is_empty() {
        return syn::Error::new(attr.span(), "#[tpu_fn] takes no arguments").to_compile_error().into();
    }
    let mut func = parse_macro_input!(item as ItemFn);
    if let Some(a) = &func.sig.asyncness {
        return syn::Error::new(a.span(), "a #[tpu_fn] cannot be `async`").to_compile_error().into();
    }
    rewrite::Rewriter { dsl: dsl_path(), counter: 0 }.visit_block_mut(&mut func.block);
    quote! {
        #[allow(unused_assignments, unreachable_code, unused_mut, clippy::needless_late_init)]
        #func
    }
    .into()
}

fn expand(mut func: ItemFn) -> syn::Result<TokenStream2> {
    let dsl = dsl_path();
    let sig = &func.sig;
    if let Some(a) = &sig.asyncness {
        return Err(syn::Error::new(a.span(), "a kernel cannot be `async`"));
    }
    if let Some(v) = &sig.variadic {
        return Err(syn::Error::new(v.span(), "a kernel cannot be variadic"));
    }
    if let syn::ReturnType::Type(_, ty) = &sig.output {
        return Err(syn::Error::new(ty.span(), "a kernel returns nothing: it writes its outputs through `&mut Ref<T>` parameters"));
    }
    if let Some(lt) = sig.generics.lifetimes().next() {
        return Err(syn::Error::new(lt.span(), "a kernel cannot have lifetime parameters"));
    }
    let params = classify(sig)?;
    signature::reject_input_stores(&params, &func.block)?;

    rewrite::Rewriter { dsl: dsl.clone(), counter: 0 }.visit_block_mut(&mut func.block);

    let name = &sig.ident;
    let name_str = name.to_string();
    let vis = &func.vis;
    let (impl_generics, ty_generics, where_clause) = sig.generics.split_for_impl();
    let turbofish = ty_generics.as_turbofish();
    let docs: Vec<_> = func.attrs.iter().filter(|a| a.path().is_ident("doc")).collect();

    let mut sigs = Vec::new();
    let mut binds = Vec::new();
    let mut call_args = Vec::new();
    let mut comptime = Vec::new();
    let mut slot = 0usize;
    for p in &params {
        let Param { ident, role, .. } = p;
        let pname = ident.to_string();
        match role {
            ParamRole::Ref { kind, wrapper, elem, mutable } => {
                let kind_ident = syn::Ident::new(kind, Span::call_site());
                sigs.push(quote! {
                    #dsl::ParamSig { name: #pname, kind: #dsl::ParamKind::#kind_ident, dtype: <#elem as #dsl::Element>::DTYPE }
                });
                let local = syn::Ident::new(&format!("__tpu_arg_{slot}"), Span::mixed_site());
                binds.push(quote! { let mut #local = #dsl::#wrapper::<#elem>::__bind(__tpu_refs[#slot]); });
                call_args.push(if *mutable { quote!(&mut #local) } else { quote!(&#local) });
                slot += 1;
            }
            ParamRole::Comptime { ty } => {
                comptime.push(quote!(#ident: #ty));
                call_args.push(quote_spanned!(ident.span()=> ::core::clone::Clone::clone(&#ident)));
            }
        }
    }

    let def_loc = quote_spanned! {name.span()=>
        #dsl::ir::Loc { file: ::core::file!(), line: ::core::line!(), column: ::core::column!() }
    };

    Ok(quote! {
        #[allow(unused_assignments, unreachable_code, unused_mut, clippy::needless_late_init)]
        #func

        #(#docs)*
        #[allow(non_camel_case_types)]
        #vis struct #name {}

        impl #name {
            /// The traceable kernel, for the given compile-time arguments.
            #[allow(clippy::redundant_clone)]
            #vis fn kernel #impl_generics (#(#comptime),*) -> #dsl::KernelDef #where_clause {
                #dsl::KernelDef::new(
                    #name_str,
                    ::std::vec![#(#sigs),*],
                    #def_loc,
                    move |__tpu_refs: &[#dsl::ir::ValueId]| {
                        #(#binds)*
                        #name #turbofish (#(#call_args),*)
                    },
                )
            }
        }
    })
}
