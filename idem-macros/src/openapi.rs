//! With the `openapi` feature: a `#[utoipa::path(...)]` among the attributes `#[idempotent]`
//! re-emits gets the `x-idempotency` extension (what the attribute says), which
//! `idem::openapi::IdempotencyDocs` turns into the operation's parameters, responses and
//! description. The attribute must be written `utoipa::path` (or `::utoipa::path`), below
//! `#[idempotent]`: above it, utoipa has expanded before `#[idempotent]` runs.

use proc_macro2::{Delimiter, Group, TokenStream, TokenTree};
use quote::quote;
use syn::{Attribute, Meta};

use crate::args::{Args, Fingerprint};

/// The attributes, with the extension added to a `#[utoipa::path]`.
pub(crate) fn mark(attrs: &[Attribute], args: &Args) -> Vec<Attribute> {
    attrs
        .iter()
        .map(|attr| {
            let path = attr.path();
            let is_utoipa_path = path.segments.len() == 2
                && path.segments[0].ident == "utoipa"
                && path.segments[1].ident == "path";
            match &attr.meta {
                Meta::List(list) if is_utoipa_path => {
                    let mut attr = attr.clone();
                    if let Meta::List(marked) = &mut attr.meta {
                        marked.tokens = with_extension(list.tokens.clone(), &extension(args));
                    }
                    attr
                }
                _ => attr.clone(),
            }
        })
        .collect()
}

/// `("x-idempotency" = json!({...}))`: utoipa parses `json!` itself.
fn extension(args: &Args) -> TokenStream {
    let header = args
        .header
        .as_ref()
        .map_or_else(|| "Idempotency-Key".to_owned(), syn::LitStr::value);
    let required = args.require_key.is_some();
    let ms = |value: Option<u64>| match value {
        Some(ms) => quote!(#ms),
        None => quote!(null),
    };
    let ttl = ms(args.ttl.as_ref().map(|d| d.value));
    let lease = ms(args.lease.as_ref().map(|d| d.value));
    let wait = ms(args.wait.as_ref().map(|d| d.value));
    let json = args
        .fingerprint
        .as_ref()
        .is_some_and(|f| f.value == Fingerprint::Json);
    let mode = if json { "json" } else { "raw" };
    let ignore = args
        .ignore
        .iter()
        .flat_map(|i| &i.pointers)
        .map(|(lit, _)| lit.value());
    quote! {
        ("x-idempotency" = json!({
            "header": #header,
            "required": #required,
            "ttl_ms": #ttl,
            "lease_ms": #lease,
            "wait_ms": #wait,
            "fingerprint": { "mode": #mode, "ignore": [#(#ignore),*] }
        }))
    }
}

/// Adds `entry` to the `extensions(...)` of utoipa's arguments, or adds `extensions(entry)`.
fn with_extension(tokens: TokenStream, entry: &TokenStream) -> TokenStream {
    let mut trees: Vec<TokenTree> = tokens.into_iter().collect();
    let ends_with_comma = |trees: &[TokenTree]| matches!(trees.last(), Some(TokenTree::Punct(p)) if p.as_char() == ',');
    let existing = (0..trees.len().saturating_sub(1)).find(|&i| {
        let after_comma =
            i == 0 || matches!(&trees[i - 1], TokenTree::Punct(p) if p.as_char() == ',');
        after_comma
            && matches!(&trees[i], TokenTree::Ident(id) if id == "extensions")
            && matches!(&trees[i + 1], TokenTree::Group(g) if g.delimiter() == Delimiter::Parenthesis)
    });
    if let Some(i) = existing {
        if let TokenTree::Group(group) = &trees[i + 1] {
            let inner: Vec<TokenTree> = group.stream().into_iter().collect();
            let comma = (!inner.is_empty() && !ends_with_comma(&inner)).then(|| quote!(,));
            let stream = group.stream();
            let mut replaced = Group::new(Delimiter::Parenthesis, quote!(#stream #comma #entry));
            replaced.set_span(group.span());
            trees[i + 1] = TokenTree::Group(replaced);
        }
        return trees.into_iter().collect();
    }
    let comma = (!trees.is_empty() && !ends_with_comma(&trees)).then(|| quote!(,));
    let tokens: TokenStream = trees.into_iter().collect();
    quote!(#tokens #comma extensions(#entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> TokenStream {
        quote!(("x" = json!(1)))
    }

    #[test]
    fn adds_extensions_or_extends_them() {
        let added = with_extension(quote!(post, path = "/p"), &entry());
        assert_eq!(
            added.to_string(),
            quote!(post, path = "/p", extensions(("x" = json!(1)))).to_string()
        );
        let trailing = with_extension(quote!(post,), &entry());
        assert_eq!(
            trailing.to_string(),
            quote!(post, extensions(("x" = json!(1)))).to_string()
        );
        let extended = with_extension(
            quote!(post, extensions(("y" = json!(2))), path = "/p"),
            &entry(),
        );
        assert_eq!(
            extended.to_string(),
            quote!(
                post,
                extensions(("y" = json!(2)), ("x" = json!(1))),
                path = "/p"
            )
            .to_string()
        );
    }
}
