//! The annotated item: checks that it is a handler the expansion can wrap.

use proc_macro2::{TokenStream, TokenTree};
use quote::ToTokens;
use syn::{Attribute, FnArg, Item, ItemFn, PatType, ReturnType, Type};

/// An `async fn` with extractor arguments and a return type: what `#[idempotent]` wraps.
pub(crate) struct Handler {
    /// The function, unchanged.
    pub(crate) item: ItemFn,
    /// Its arguments, in order (no receiver).
    pub(crate) args: Vec<PatType>,
    /// Its return type.
    pub(crate) output: Type,
}

impl Handler {
    /// Checks `item`, reporting every problem at once.
    pub(crate) fn from_item(item: Item) -> syn::Result<Self> {
        let item = match item {
            Item::Fn(item) => item,
            other => return Err(not_a_fn(&other)),
        };
        let mut errors = Errors::default();
        let sig = &item.sig;
        if let Some(constness) = &sig.constness {
            errors.push(
                constness,
                "an `#[idempotent]` handler cannot be a `const fn`: remove `const`",
            );
        }
        if sig.asyncness.is_none() {
            errors.push(
                sig.fn_token,
                "an `#[idempotent]` handler must be an `async fn`: add `async` before `fn`",
            );
        }
        if let Some(unsafety) = &sig.unsafety {
            errors.push(
                unsafety,
                "an `#[idempotent]` handler cannot be an `unsafe fn`: remove `unsafe` and use an \
                 `unsafe` block inside the handler",
            );
        }
        if let Some(abi) = &sig.abi {
            errors.push(
                abi,
                "an `#[idempotent]` handler cannot declare an ABI: actix-web calls it as a Rust \
                 `async fn`; remove the `extern`",
            );
        }
        if !sig.generics.params.is_empty() {
            errors.push(
                &sig.generics,
                "an `#[idempotent]` handler cannot be generic: actix-web registers one concrete \
                 function; remove the generic parameters and name concrete extractor types",
            );
        } else if let Some(where_clause) = &sig.generics.where_clause {
            errors.push(
                where_clause,
                "an `#[idempotent]` handler cannot have a `where` clause: remove it",
            );
        }
        if let Some(variadic) = &sig.variadic {
            errors.push(
                variadic,
                "an `#[idempotent]` handler cannot be variadic: take each extractor as an argument",
            );
        }
        let mut args = Vec::new();
        for input in &sig.inputs {
            match input {
                FnArg::Receiver(receiver) => errors.push(
                    receiver,
                    "an `#[idempotent]` handler cannot take `self`: actix-web handlers are free \
                     functions; move the handler out of the `impl` block, or make it a free \
                     function that calls the method",
                ),
                FnArg::Typed(arg) if mentions_impl(arg.ty.to_token_stream()) => errors.push(
                    &arg.ty,
                    "an `#[idempotent]` handler cannot take `impl Trait` arguments: each \
                     argument is extracted by its type; name the extractor type",
                ),
                FnArg::Typed(arg) => args.push(arg.clone()),
            }
        }
        let output = match &sig.output {
            ReturnType::Type(_, ty) => Some((**ty).clone()),
            ReturnType::Default => {
                errors.push_span(
                    sig.paren_token.span.close(),
                    "an `#[idempotent]` handler needs a return type: declare what it responds \
                     with, for example `-> impl Responder` or `-> HttpResponse`",
                );
                None
            }
        };
        if let Some(again) = item.attrs.iter().find(|attr| is_idempotent(attr)) {
            errors.push(
                again,
                "`#[idempotent]` is applied more than once to this handler: keep only one",
            );
        }
        errors.finish()?;
        match output {
            Some(output) => Ok(Self { item, args, output }),
            // Unreachable: a missing return type is an error above.
            None => Err(syn::Error::new_spanned(&item.sig, "missing return type")),
        }
    }
}

/// The error for an item that is not a function, at its keyword.
fn not_a_fn(item: &Item) -> syn::Error {
    let (what, keyword): (&str, &dyn ToTokens) = match item {
        Item::Struct(item) => ("a struct", &item.struct_token),
        Item::Enum(item) => ("an enum", &item.enum_token),
        Item::Union(item) => ("a union", &item.union_token),
        Item::Impl(item) => ("an `impl` block", &item.impl_token),
        Item::Trait(item) => ("a trait", &item.trait_token),
        Item::Mod(item) => ("a module", &item.mod_token),
        Item::Const(item) => ("a const", &item.const_token),
        Item::Static(item) => ("a static", &item.static_token),
        Item::Type(item) => ("a type alias", &item.type_token),
        Item::Use(item) => ("a `use`", &item.use_token),
        other => ("this item", other),
    };
    syn::Error::new_spanned(
        keyword,
        format!(
            "`#[idempotent]` applies to an `async fn` handler, not to {what}: put it on the \
             handler function, next to its route attribute"
        ),
    )
}

/// Whether the tokens contain `impl` (an anonymous generic the expansion cannot name).
fn mentions_impl(tokens: TokenStream) -> bool {
    tokens.into_iter().any(|tt| match tt {
        TokenTree::Ident(ident) => ident == "impl",
        TokenTree::Group(group) => mentions_impl(group.stream()),
        _ => false,
    })
}

/// `#[idempotent]`, `#[idem::idempotent]`, ...
fn is_idempotent(attr: &Attribute) -> bool {
    attr.path()
        .segments
        .last()
        .is_some_and(|segment| segment.ident == "idempotent")
}

/// Errors gathered so that one compile reports all of them.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, tokens: impl ToTokens, message: &str) {
        self.add(syn::Error::new_spanned(tokens, message));
    }

    fn push_span(&mut self, span: proc_macro2::Span, message: &str) {
        self.add(syn::Error::new(span, message));
    }

    fn add(&mut self, error: syn::Error) {
        match &mut self.0 {
            None => self.0 = Some(error),
            Some(errors) => errors.combine(error),
        }
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(item: &str) -> Result<Handler, String> {
        let item = syn::parse_str::<Item>(item).map_err(|e| format!("parse: {e}"))?;
        Handler::from_item(item).map_err(|e| {
            e.into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        })
    }

    #[test]
    fn accepts_a_handler() {
        let handler = check("async fn f(a: A, web::Path((x, y)): web::Path<(u32, u32)>) -> R {}");
        assert_eq!(handler.map(|h| h.args.len()), Ok(2));
        assert!(check("pub(crate) async fn f() -> impl Responder {}").is_ok());
    }

    #[test]
    fn reports_every_problem() {
        let Err(errors) = check("const unsafe extern \"C\" fn f<T>(self, x: impl Sized) {}") else {
            panic!("accepted");
        };
        for needle in [
            "`const fn`",
            "must be an `async fn`",
            "`unsafe fn`",
            "ABI",
            "generic",
            "`self`",
            "`impl Trait`",
            "return type",
        ] {
            assert!(errors.contains(needle), "{needle} missing from {errors}");
        }
    }

    #[test]
    fn refuses_other_items() {
        assert!(check("struct S;").is_err_and(|e| e.contains("not to a struct")));
        assert!(check("#[idempotent] async fn f() -> R {}")
            .is_err_and(|e| e.contains("more than once")));
        assert!(check("async fn f() -> R where R: Sized {}").is_err_and(|e| e.contains("`where`")));
        assert!(check("async fn f(x: Json<impl Sized>) -> R {}").is_err_and(|e| e.contains("impl")));
        assert!(check("async unsafe extern \"C\" fn f(x: u8, ...) -> R {}")
            .is_err_and(|e| e.contains("variadic")));
    }
}
