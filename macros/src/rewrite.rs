//! The body rewrite: comparisons, `&&`/`||`, `if` and `for` become calls into the dsl's
//! control scopes. Children are rewritten first, so nested regions expand inside out.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::visit_mut::{self, VisitMut};
use syn::{BinOp, Expr, ExprForLoop, ExprIf, Ident, RangeLimits};

pub struct Rewriter {
    pub dsl: TokenStream,
    pub counter: usize,
}

/// `ts` with every token placed at `span`, so `#[track_caller]` locations in the emitted
/// calls point at the user's expression rather than at the `#[tpu_kernel]` attribute.
fn respan(ts: &TokenStream, span: Span) -> TokenStream {
    ts.clone()
        .into_iter()
        .map(|mut t| {
            t.set_span(span);
            t
        })
        .collect()
}

impl Rewriter {
    fn fresh(&mut self, base: &str) -> Ident {
        self.counter += 1;
        Ident::new(&format!("__tpu_{base}{}", self.counter), Span::mixed_site())
    }
}

/// Variables a region assigns that were declared outside it, in order of first assignment.
fn carried(body: &dyn Fn(&mut Collector)) -> Vec<Ident> {
    let mut c = Collector { assigned: Vec::new(), declared: Vec::new() };
    body(&mut c);
    c.assigned.into_iter().filter(|a| !c.declared.contains(a)).collect()
}

pub struct Collector {
    assigned: Vec<Ident>,
    declared: Vec<Ident>,
}

fn place_base(e: &Expr) -> Option<&Ident> {
    match e {
        Expr::Path(p) => p.path.get_ident(),
        Expr::Field(f) => place_base(&f.base),
        Expr::Index(i) => place_base(&i.expr),
        Expr::Paren(p) => place_base(&p.expr),
        _ => None,
    }
}

fn is_compound_assign(op: &BinOp) -> bool {
    matches!(
        op,
        BinOp::AddAssign(_)
            | BinOp::SubAssign(_)
            | BinOp::MulAssign(_)
            | BinOp::DivAssign(_)
            | BinOp::RemAssign(_)
            | BinOp::BitAndAssign(_)
            | BinOp::BitOrAssign(_)
            | BinOp::BitXorAssign(_)
            | BinOp::ShlAssign(_)
            | BinOp::ShrAssign(_)
    )
}

impl Collector {
    fn assign(&mut self, target: &Expr) {
        if let Some(id) = place_base(target) {
            if !self.assigned.contains(id) {
                self.assigned.push(id.clone());
            }
        }
    }
}

impl<'ast> Visit<'ast> for Collector {
    fn visit_expr_assign(&mut self, a: &'ast syn::ExprAssign) {
        self.assign(&a.left);
        syn::visit::visit_expr_assign(self, a);
    }
    fn visit_expr_binary(&mut self, b: &'ast syn::ExprBinary) {
        if is_compound_assign(&b.op) {
            self.assign(&b.left);
        }
        syn::visit::visit_expr_binary(self, b);
    }
    fn visit_pat_ident(&mut self, p: &'ast syn::PatIdent) {
        self.declared.push(p.ident.clone());
        syn::visit::visit_pat_ident(self, p);
    }
    // A closure's assignments are its own business, and nested items are not kernel code.
    fn visit_expr_closure(&mut self, _: &'ast syn::ExprClosure) {}
    fn visit_item(&mut self, _: &'ast syn::Item) {}
}

impl VisitMut for Rewriter {
    fn visit_item_mut(&mut self, _: &mut syn::Item) {}

    fn visit_expr_mut(&mut self, e: &mut Expr) {
        visit_mut::visit_expr_mut(self, e);
        let new = match e {
            Expr::Binary(b) => {
                let (l, r, span) = (&b.left, &b.right, b.span());
                let dsl = respan(&self.dsl, span);
                let cmp = |f: &str| {
                    let f = Ident::new(f, span);
                    quote_spanned!(span=> #dsl::trace::control::#f(&(#l), &(#r)))
                };
                match b.op {
                    BinOp::Eq(_) => cmp("eq"),
                    BinOp::Ne(_) => cmp("ne"),
                    BinOp::Lt(_) => cmp("lt"),
                    BinOp::Le(_) => cmp("le"),
                    BinOp::Gt(_) => cmp("gt"),
                    BinOp::Ge(_) => cmp("ge"),
                    BinOp::And(_) => quote_spanned!(span=> #dsl::trace::control::and(#l, || #r)),
                    BinOp::Or(_) => quote_spanned!(span=> #dsl::trace::control::or(#l, || #r)),
                    _ => return,
                }
            }
            Expr::If(i) => {
                if matches!(*i.cond, Expr::Let(_)) {
                    return;
                }
                self.expand_if(i)
            }
            Expr::ForLoop(f) => match self.expand_for(f) {
                Some(ts) => ts,
                None => return,
            },
            Expr::While(w) => {
                if matches!(*w.cond, Expr::Let(_)) {
                    return;
                }
                self.expand_while(w)
            }
            _ => return,
        };
        *e = Expr::Verbatim(new);
    }
}

impl Rewriter {
    fn expand_if(&mut self, i: &ExprIf) -> TokenStream {
        let span = i.if_token.span();
        let dsl = &respan(&self.dsl, span);
        let cond = &i.cond;
        let then_block = &i.then_branch;
        let else_expr = match &i.else_branch {
            Some((_, e)) => quote!(#e),
            None => quote!(()),
        };
        let vars = carried(&|c| {
            c.visit_block(&i.then_branch);
            if let Some((_, e)) = &i.else_branch {
                c.visit_expr(e);
            }
        });
        let s = self.fresh("if");
        let (t, el, v) = (self.fresh("then"), self.fresh("else"), self.fresh("value"));
        quote_spanned! {span=>
            {
                let mut #s = #dsl::trace::control::if_scope(#cond);
                #( #s.carry(&#vars); )*
                let #t = if #s.begin_then() {
                    let #v = #then_block;
                    #s.end_branch(&#v);
                    #( #s.yield_(&#vars); )*
                    #( #vars = #s.restore(#vars); )*
                    ::core::option::Option::Some(#v)
                } else {
                    ::core::option::Option::None
                };
                let #el = if #s.begin_else() {
                    let #v = #else_expr;
                    #s.end_branch(&#v);
                    #( #s.yield_(&#vars); )*
                    ::core::option::Option::Some(#v)
                } else {
                    ::core::option::Option::None
                };
                let #v = #s.finish(#t, #el);
                #( #vars = #s.result(#vars); )*
                #v
            }
        }
    }

    /// `while cond { body }`: a plain Rust loop when `cond` is a `bool`, a `While` op when it
    /// is a `Scalar<bool>` (the scope is picked from the condition's type, through a closure
    /// that is never called).
    fn expand_while(&mut self, w: &syn::ExprWhile) -> TokenStream {
        let span = w.while_token.span();
        let dsl = &respan(&self.dsl, span);
        let (cond, body, label) = (&w.cond, &w.body, &w.label);
        let vars = carried(&|c| {
            c.visit_expr(&w.cond);
            c.visit_block(&w.body);
        });
        let s = self.fresh("while");
        quote_spanned! {span=>
            {
                let mut #s = #dsl::trace::control::while_scope(|| #cond);
                #( #s.carry(&#vars); )*
                #label loop {
                    #s.begin_condition();
                    #( #vars = #s.enter_condition(#vars); )*
                    if !#s.test(#cond) {
                        break;
                    }
                    #( #vars = #s.enter_body(#vars); )*
                    #body
                    #( #s.yield_(&#vars); )*
                    if #s.traced() {
                        break;
                    }
                }
                #( #vars = #s.result(#vars); )*
            }
        }
    }

    /// `for pat in lo..hi`; other loops stay as they are (plain Rust iteration).
    fn expand_for(&mut self, f: &ExprForLoop) -> Option<TokenStream> {
        let Expr::Range(range) = &*f.expr else { return None };
        let (Some(lo), Some(hi), RangeLimits::HalfOpen(_)) = (&range.start, &range.end, &range.limits) else { return None };
        let span = f.for_token.span();
        let dsl = &respan(&self.dsl, span);
        let (pat, body, label) = (&f.pat, &f.body, &f.label);
        let vars = carried(&|c| {
            c.visit_pat(&f.pat);
            c.visit_block(&f.body);
        });
        let s = self.fresh("for");
        let iv = self.fresh("iv");
        Some(quote_spanned! {span=>
            {
                let mut #s = #dsl::trace::control::for_scope(#lo, #hi);
                #( #s.carry(&#vars); )*
                #label while let ::core::option::Option::Some(#iv) = #s.next() {
                    #( #vars = #s.enter(#vars); )*
                    let #pat = #iv;
                    #body
                    #( #s.yield_(&#vars); )*
                }
                #( #vars = #s.result(#vars); )*
            }
        })
    }
}
