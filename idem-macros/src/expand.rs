//! The expansion: one `async fn (HttpRequest, Payload) -> HttpResponse` with the same name that
//! runs the user's handler, unchanged and nested inside it, through `::idem::__private::handle`.

use proc_macro2::{Literal, Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens as _};
use syn::{ext::IdentExt as _, spanned::Spanned as _, Ident, Item, LitStr};

use crate::{
    args::{Args, Fingerprint},
    handler::Handler,
};

/// Expands `#[idempotent(args)] item`. On error, the item is emitted unchanged next to the error,
/// so that the rest of the crate (and the IDE) still sees the function.
pub(crate) fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    match try_expand(args, item.clone()) {
        Ok(expanded) => expanded,
        Err(error) => {
            let error = error.into_compile_error();
            quote!(#item #error)
        }
    }
}

fn try_expand(args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let args = syn::parse2::<Args>(args);
    let handler = syn::parse2::<Item>(item).and_then(Handler::from_item);
    match (args, handler) {
        (Ok(args), Ok(handler)) => Ok(expand(&args, &handler)),
        (Err(mut error), Err(more)) => {
            error.combine(more);
            Err(error)
        }
        (Err(error), Ok(_)) | (Ok(_), Err(error)) => Err(error),
    }
}

fn expand(args: &Args, handler: &Handler) -> TokenStream {
    // Names the expansion introduces. Mixed-site hygiene: the user's code (its body, its argument
    // patterns) cannot see them, and they cannot shadow the user's names.
    let site = Span::mixed_site();
    let req = Ident::new("req", site);
    let payload = Ident::new("payload", site);
    let spec = Ident::new("SPEC", site);
    let ok = Ident::new("value", site);
    let err = Ident::new("error", site);
    let values: Vec<Ident> = (0..handler.args.len())
        .map(|i| format_ident!("arg{}", i, span = site))
        .collect();

    let user_fn = &handler.item;
    #[cfg(feature = "openapi")]
    let attrs = &crate::openapi::mark(&user_fn.attrs, args);
    #[cfg(not(feature = "openapi"))]
    let attrs = &user_fn.attrs;
    let vis = &user_fn.vis;
    let name = &user_fn.sig.ident;
    let asyncness = &user_fn.sig.asyncness;
    let fn_token = &user_fn.sig.fn_token;
    // The user's function, nested inside the wrapper under the same name: its patterns, return
    // type and body are untouched, and a recursive call in its body still means itself. The
    // attributes (route, docs, lints) stay on the wrapper. `clippy::unused_async` would fire on
    // the nested function only because it is now called rather than handed to actix-web as a
    // value: a handler is async whether or not it awaits.
    let mut inner = user_fn.clone();
    inner.attrs = vec![syn::parse_quote!(#[allow(clippy::unused_async)])];
    inner.vis = syn::Visibility::Inherited;

    let scope = match &args.scope {
        Some(ty) => ty.to_token_stream(),
        None => quote!(::idem::__private::AppScope),
    };
    let spec_fields = spec_fields(args);
    let key_header = key_header(args);
    let handler_name = LitStr::new(&name.unraw().to_string(), name.span());

    // Each argument is extracted by its own type, in order; an extractor's refusal is the response
    // (and is stored like any other). A type that is not an extractor is reported at that type.
    let extract = handler.args.iter().zip(&values).map(|(arg, value)| {
        let ty = &arg.ty;
        quote_spanned! {ty.span()=>
            let #value = match <#ty as ::idem::__private::actix_web::FromRequest>::from_request(
                &#req,
                &mut #payload,
            )
            .await
            {
                ::core::result::Result::Ok(#ok) => #ok,
                ::core::result::Result::Err(#err) => {
                    return ::idem::__private::extractor_error(#err);
                }
            };
        }
    });
    let payload_pattern = if values.is_empty() {
        quote!(_)
    } else {
        quote!(mut #payload)
    };
    // A return type that is not a `Responder` is reported at the user's return type.
    let output_span = handler.output.span();
    let mut call = name.clone();
    call.set_span(output_span);
    let respond = quote_spanned! {output_span=>
        ::idem::__private::respond(#call(#(#values),*).await, &#req)
    };

    // A `scope` type that is not an `IdempotencyScope` is reported once, at the user's type: every
    // token that carries the bound (the alias, the call, the `.await`) has the same span, so rustc
    // folds the identical errors into one. (A separate `assert_scope::<T>()` would add a second,
    // differently-worded error for the same mistake.)
    let scope_span = args
        .scope
        .as_ref()
        .map_or_else(Span::call_site, |ty| ty.span());
    let scope_alias = Ident::new("__IdemScope", scope_span);
    let handle = quote_spanned! {scope_span=> {
        type #scope_alias = #scope;
        ::idem::__private::handle::<#scope_alias, _, _>(
            #req,
            #payload,
            {
                // Every field is written out: a `..base` whose `HeaderName` were replaced would have
                // to be dropped at compile time, which a `static` cannot do.
                static #spec: ::idem::__private::HandlerSpec = ::idem::__private::HandlerSpec {
                    handler: #handler_name,
                    header: #key_header,
                    #spec_fields
                };
                &#spec
            },
            move |#req, #payload_pattern| async move {
                #(#extract)*
                #respond
            },
        )
        .await
    }};

    quote! {
        #(#attrs)*
        #vis #asyncness #fn_token #name(
            #req: ::idem::__private::actix_web::HttpRequest,
            #payload: ::idem::__private::actix_web::web::Payload,
        ) -> ::idem::__private::actix_web::HttpResponse {
            #inner
            #handle
        }
    }
}

/// The key header: `HeaderName::from_static` (a `const fn`) takes the lower-case name, which the
/// parser checked is a valid header name; the spelling is kept for messages.
fn key_header(args: &Args) -> TokenStream {
    match &args.header {
        Some(header) => {
            let lower = LitStr::new(&header.value().to_ascii_lowercase(), header.span());
            let spelled = LitStr::new(&header.value(), header.span());
            quote!(::idem::__private::KeyHeader::new(#lower, #spelled))
        }
        None => quote!(::idem::__private::KeyHeader::DEFAULT),
    }
}

/// The `HandlerSpec` fields the arguments set, and the defaults of the others.
fn spec_fields(args: &Args) -> TokenStream {
    let duration = |value: Option<u64>| match value {
        Some(ms) => quote!(::core::option::Option::Some(
            ::idem::__private::Duration::from_millis(#ms)
        )),
        None => quote!(::core::option::Option::None),
    };
    let ttl = duration(args.ttl.as_ref().map(|d| d.value));
    let lease = duration(args.lease.as_ref().map(|d| d.value));
    let in_flight_wait = duration(args.wait.as_ref().map(|d| d.value));
    let require_key = args.require_key.is_some();
    let fail_open = args.fail_open.is_some();
    let server_errors = if args.store_server_errors.is_some() {
        quote!(::idem::__private::ServerErrors::Store)
    } else {
        quote!(::idem::__private::ServerErrors::Release)
    };
    let max_body = match &args.max_body {
        Some(max_body) => {
            let value = Literal::u64_unsuffixed(max_body.value);
            quote_spanned!(max_body.span=> ::core::option::Option::Some(#value))
        }
        None => quote!(::core::option::Option::None),
    };
    let fingerprint = match (&args.fingerprint, &args.ignore) {
        (Some(mode), ignore) if mode.value == Fingerprint::Json => {
            let pointers = ignore
                .iter()
                .flat_map(|i| &i.pointers)
                .map(|(lit, tokens)| {
                    let tokens = tokens.iter().map(|t| LitStr::new(t, lit.span()));
                    quote!(&[#(#tokens),*])
                });
            quote!(::idem::__private::FingerprintMode::Json { ignore: &[#(#pointers),*] })
        }
        _ => quote!(::idem::__private::FingerprintMode::Raw),
    };
    quote! {
        ttl: #ttl,
        lease: #lease,
        require_key: #require_key,
        in_flight_wait: #in_flight_wait,
        fail_open: #fail_open,
        server_errors: #server_errors,
        max_body: #max_body,
        fingerprint: #fingerprint,
        timing: ::idem::__private::HandlerTiming::new(),
    }
}
