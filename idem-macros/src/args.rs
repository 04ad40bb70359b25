//! The arguments of `#[idempotent(...)]`, parsed and checked at compile time.

use proc_macro2::{Span, TokenStream, TokenTree};
use syn::{
    ext::IdentExt as _,
    parse::{Parse, ParseStream},
    Ident, LitInt, LitStr, Token, Type,
};

use crate::{duration, size};

/// Custom keywords: one per argument, so that `lookahead1` lists them all in "expected one of".
mod kw {
    syn::custom_keyword!(ttl);
    syn::custom_keyword!(lease);
    syn::custom_keyword!(require_key);
    syn::custom_keyword!(header);
    syn::custom_keyword!(scope);
    syn::custom_keyword!(wait);
    syn::custom_keyword!(fail_open);
    syn::custom_keyword!(store_server_errors);
    syn::custom_keyword!(max_body);
    syn::custom_keyword!(fingerprint);
    syn::custom_keyword!(ignore);
}

/// Every argument's name, for suggestions.
const NAMES: [&str; 11] = [
    "ttl",
    "lease",
    "require_key",
    "header",
    "scope",
    "wait",
    "fail_open",
    "store_server_errors",
    "max_body",
    "fingerprint",
    "ignore",
];

/// The runtime's default record retention (`Idempotency::DEFAULT_TTL`), which a `lease` is
/// compared with when the handler sets no `ttl`. A proc-macro crate cannot depend on the runtime,
/// so the value is copied; the runtime checks the resolved pair again (a handler's `lease` under
/// an app's shorter `ttl`), so a drift here could only let a mistake through to that check.
const DEFAULT_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// The runtime's bounds, `Idempotency::MAX_TTL` and `Idempotency::MAX_LEASE` (copied, as above).
const MAX_TTL: (u64, &str) = (365 * 24 * 60 * 60 * 1000, "365d");
const MAX_LEASE: (u64, &str) = (24 * 60 * 60 * 1000, "24h");

/// A value, the span of the literal it was written as, and that literal's text.
#[derive(Debug, Clone)]
pub(crate) struct Spanned<T> {
    pub(crate) value: T,
    pub(crate) span: Span,
    pub(crate) written: String,
}

/// The parsed arguments. `None` (or `false`) means "not written": the runtime's default.
#[derive(Default)]
pub(crate) struct Args {
    /// Record retention, in milliseconds.
    pub(crate) ttl: Option<Spanned<u64>>,
    /// In-flight lease, in milliseconds.
    pub(crate) lease: Option<Spanned<u64>>,
    /// The span of the `require_key` flag.
    pub(crate) require_key: Option<Span>,
    /// The key header, as the user spelled it.
    pub(crate) header: Option<LitStr>,
    /// The scope extractor type.
    pub(crate) scope: Option<Type>,
    /// How long to wait for an in-flight duplicate, in milliseconds.
    pub(crate) wait: Option<Spanned<u64>>,
    /// The span of the `fail_open` flag.
    pub(crate) fail_open: Option<Span>,
    /// The span of the `store_server_errors` flag.
    pub(crate) store_server_errors: Option<Span>,
    /// The request body limit, in bytes.
    pub(crate) max_body: Option<Spanned<u64>>,
    /// How the body enters the fingerprint.
    pub(crate) fingerprint: Option<Spanned<Fingerprint>>,
    /// The JSON pointers left out of a JSON fingerprint.
    pub(crate) ignore: Option<Ignore>,
}

/// The values of `fingerprint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fingerprint {
    /// `"raw"`: the body's bytes (the default).
    Raw,
    /// `"json"`: the body's canonical JSON form.
    Json,
}

/// `ignore = ["/client_ts", "/trace/id"]`.
pub(crate) struct Ignore {
    /// The span of the `ignore` keyword.
    pub(crate) span: Span,
    /// Each pointer as written, and its unescaped reference tokens.
    pub(crate) pointers: Vec<(LitStr, Vec<String>)>,
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Self::default();
        while !input.is_empty() {
            let lookahead = input.lookahead1();
            if lookahead.peek(kw::ttl) {
                let key = input.parse::<kw::ttl>()?;
                once(&args.ttl, "ttl", key.span)?;
                args.ttl = Some(duration_value(input, "ttl", "24h", key.span)?);
            } else if lookahead.peek(kw::lease) {
                let key = input.parse::<kw::lease>()?;
                once(&args.lease, "lease", key.span)?;
                args.lease = Some(duration_value(input, "lease", "30s", key.span)?);
            } else if lookahead.peek(kw::require_key) {
                let key = input.parse::<kw::require_key>()?;
                once(&args.require_key, "require_key", key.span)?;
                flag(input, "require_key")?;
                args.require_key = Some(key.span);
            } else if lookahead.peek(kw::header) {
                let key = input.parse::<kw::header>()?;
                once(&args.header, "header", key.span)?;
                let value = string_value(input, "header", "\"X-Request-Id\"", key.span)?;
                header_name(&value)?;
                args.header = Some(value);
            } else if lookahead.peek(kw::scope) {
                let key = input.parse::<kw::scope>()?;
                once(&args.scope, "scope", key.span)?;
                equals(input, "scope", "AuthUser", key.span)?;
                args.scope = Some(input.parse()?);
            } else if lookahead.peek(kw::wait) {
                let key = input.parse::<kw::wait>()?;
                once(&args.wait, "wait", key.span)?;
                args.wait = Some(duration_value(input, "wait", "5s", key.span)?);
            } else if lookahead.peek(kw::fail_open) {
                let key = input.parse::<kw::fail_open>()?;
                once(&args.fail_open, "fail_open", key.span)?;
                flag(input, "fail_open")?;
                args.fail_open = Some(key.span);
            } else if lookahead.peek(kw::store_server_errors) {
                let key = input.parse::<kw::store_server_errors>()?;
                once(&args.store_server_errors, "store_server_errors", key.span)?;
                flag(input, "store_server_errors")?;
                args.store_server_errors = Some(key.span);
            } else if lookahead.peek(kw::max_body) {
                let key = input.parse::<kw::max_body>()?;
                once(&args.max_body, "max_body", key.span)?;
                args.max_body = Some(size_value(input, key.span)?);
            } else if lookahead.peek(kw::fingerprint) {
                let key = input.parse::<kw::fingerprint>()?;
                once(&args.fingerprint, "fingerprint", key.span)?;
                let value = string_value(input, "fingerprint", "\"json\"", key.span)?;
                args.fingerprint = Some(fingerprint_mode(&value)?);
            } else if lookahead.peek(kw::ignore) {
                let key = input.parse::<kw::ignore>()?;
                once(&args.ignore, "ignore", key.span)?;
                args.ignore = Some(ignore_value(input, key.span)?);
            } else if input.peek(Ident::peek_any) {
                let unknown = input.call(Ident::parse_any)?;
                return Err(unknown_argument(&unknown, lookahead.error()));
            } else {
                return Err(lookahead.error());
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        args.check_bounds()?;
        args.check_lease()?;
        args.check_ignore()?;
        Ok(args)
    }
}

impl Args {
    /// Durations past what the stores can keep: a record kept for years, a lease of days.
    fn check_bounds(&self) -> syn::Result<()> {
        for (name, value, (max, written)) in [
            ("ttl", &self.ttl, MAX_TTL),
            ("lease", &self.lease, MAX_LEASE),
        ] {
            if let Some(value) = value.as_ref().filter(|v| v.value > max) {
                return Err(syn::Error::new(
                    value.span,
                    format!(
                        "`{name}` ({}) is longer than the longest allowed, {written}",
                        value.written
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `ignore` names parts of a JSON body: without the JSON fingerprint there are none.
    fn check_ignore(&self) -> syn::Result<()> {
        let json = self
            .fingerprint
            .as_ref()
            .is_some_and(|f| f.value == Fingerprint::Json);
        match &self.ignore {
            Some(ignore) if !json => Err(syn::Error::new(
                ignore.span,
                "`ignore` leaves parts of a JSON body out of the fingerprint, so it needs \
                 `fingerprint = \"json\"`; the raw fingerprint compares the body's bytes whole",
            )),
            _ => Ok(()),
        }
    }

    /// A lease at least as long as the record's retention would keep a crashed request's key
    /// blocked for longer than its record lives.
    fn check_lease(&self) -> syn::Result<()> {
        let Some(lease) = &self.lease else {
            return Ok(());
        };
        let (ttl, written, which) = match &self.ttl {
            Some(ttl) => (ttl.value, ttl.written.as_str(), "`ttl`"),
            None => (DEFAULT_TTL_MS, "24h", "the default `ttl`"),
        };
        if lease.value < ttl {
            return Ok(());
        }
        Err(syn::Error::new(
            lease.span,
            format!(
                "`lease` ({}) must be shorter than {which} ({written}): the lease bounds how \
                 long an unfinished request holds its key, the ttl how long the finished response \
                 is kept; shorten `lease` or lengthen `ttl`",
                lease.written,
            ),
        ))
    }
}

/// Refuses an argument's second occurrence.
fn once<T>(slot: &Option<T>, name: &str, span: Span) -> syn::Result<()> {
    match slot {
        None => Ok(()),
        Some(_) => Err(syn::Error::new(
            span,
            format!("`{name}` set multiple times; keep only one"),
        )),
    }
}

/// Parses the `=` after an argument's name.
fn equals(input: ParseStream<'_>, name: &str, example: &str, key: Span) -> syn::Result<()> {
    if input.peek(Token![=]) {
        input.parse::<Token![=]>()?;
        Ok(())
    } else {
        Err(syn::Error::new(
            key,
            format!("`{name}` needs a value, for example `{name} = {example}`"),
        ))
    }
}

/// Parses `= "..."`.
fn string_value(
    input: ParseStream<'_>,
    name: &str,
    example: &str,
    key: Span,
) -> syn::Result<LitStr> {
    equals(input, name, example, key)?;
    if input.peek(LitStr) {
        input.parse()
    } else {
        Err(syn::Error::new_spanned(
            rest_of_argument(input)?,
            format!("`{name}` takes a string, for example `{name} = {example}`"),
        ))
    }
}

/// Parses `= "24h"` into milliseconds.
fn duration_value(
    input: ParseStream<'_>,
    name: &str,
    example: &str,
    key: Span,
) -> syn::Result<Spanned<u64>> {
    let quoted = format!("\"{example}\"");
    equals(input, name, &quoted, key)?;
    if !input.peek(LitStr) {
        return Err(syn::Error::new_spanned(
            rest_of_argument(input)?,
            format!(
                "`{name}` takes a duration string, for example `{name} = {quoted}`; {}",
                duration::ACCEPTED
            ),
        ));
    }
    let lit = input.parse::<LitStr>()?;
    let written = lit.value();
    match duration::parse_millis(&written) {
        Ok(value) => Ok(Spanned {
            value,
            span: lit.span(),
            written,
        }),
        Err(err) => Err(syn::Error::new(lit.span(), err.message(name, &written))),
    }
}

/// Parses `= 65536` or `= "64KiB"` into bytes.
fn size_value(input: ParseStream<'_>, key: Span) -> syn::Result<Spanned<u64>> {
    equals(input, "max_body", "\"64KiB\"", key)?;
    let (parsed, span, written) = if input.peek(LitInt) {
        let lit = input.parse::<LitInt>()?;
        if !matches!(lit.suffix(), "" | "usize") {
            return Err(syn::Error::new(
                lit.span(),
                format!(
                    "`max_body` is a `usize`: remove the `{}` suffix",
                    lit.suffix()
                ),
            ));
        }
        let bytes = lit.base10_parse::<u64>()?;
        (size::nonzero(bytes), lit.span(), lit.to_string())
    } else if input.peek(LitStr) {
        let lit = input.parse::<LitStr>()?;
        let written = lit.value();
        (size::parse_bytes(&written), lit.span(), written)
    } else {
        return Err(syn::Error::new_spanned(
            rest_of_argument(input)?,
            format!("`max_body` takes a size; {}", size::ACCEPTED),
        ));
    };
    match parsed {
        Ok(value) => Ok(Spanned {
            value,
            span,
            written,
        }),
        Err(err) => Err(syn::Error::new(span, err.message(&written))),
    }
}

/// `"raw"` or `"json"`.
fn fingerprint_mode(lit: &LitStr) -> syn::Result<Spanned<Fingerprint>> {
    let written = lit.value();
    let value = match written.as_str() {
        "raw" => Fingerprint::Raw,
        "json" => Fingerprint::Json,
        _ => {
            return Err(syn::Error::new(
                lit.span(),
                format!(
                    "`fingerprint` is \"raw\" (the body's bytes, the default) or \"json\" (the \
                     body's canonical JSON form), not \"{written}\""
                ),
            ))
        }
    };
    Ok(Spanned {
        value,
        span: lit.span(),
        written,
    })
}

/// Parses `= ["/a", "/b/c"]`: at least one JSON pointer, each valid and none reaching into
/// another.
fn ignore_value(input: ParseStream<'_>, key: Span) -> syn::Result<Ignore> {
    const EXAMPLE: &str = "`ignore = [\"/client_ts\", \"/trace/id\"]`";
    equals(input, "ignore", "[\"/client_ts\"]", key)?;
    if !input.peek(syn::token::Bracket) {
        return Err(syn::Error::new_spanned(
            rest_of_argument(input)?,
            format!("`ignore` takes a list of JSON pointers (RFC 6901), for example {EXAMPLE}"),
        ));
    }
    let content;
    let brackets = syn::bracketed!(content in input);
    let mut pointers: Vec<(LitStr, Vec<String>)> = Vec::new();
    while !content.is_empty() {
        if !content.peek(LitStr) {
            return Err(syn::Error::new_spanned(
                rest_of_argument(&content)?,
                format!("`ignore` lists JSON pointers as strings, for example {EXAMPLE}"),
            ));
        }
        let lit = content.parse::<LitStr>()?;
        let tokens = json_pointer(&lit)?;
        for (earlier, earlier_tokens) in &pointers {
            let shorter = earlier_tokens.len().min(tokens.len());
            if earlier_tokens[..shorter] != tokens[..shorter] {
                continue;
            }
            let message = if earlier_tokens.len() == tokens.len() {
                format!("\"{}\" is listed twice in `ignore`", lit.value())
            } else {
                let (outer, inner) = if earlier_tokens.len() < tokens.len() {
                    (earlier.value(), lit.value())
                } else {
                    (lit.value(), earlier.value())
                };
                format!(
                    "\"{inner}\" is inside \"{outer}\", which `ignore` already leaves out \
                     whole: keep only one of them"
                )
            };
            return Err(syn::Error::new(lit.span(), message));
        }
        pointers.push((lit, tokens));
        if content.is_empty() {
            break;
        }
        content.parse::<Token![,]>()?;
    }
    if pointers.is_empty() {
        return Err(syn::Error::new(
            brackets.span.join(),
            format!("`ignore` lists no pointer: name at least one, as in {EXAMPLE}, or leave `ignore` out"),
        ));
    }
    Ok(Ignore {
        span: key,
        pointers,
    })
}

/// Checks a JSON pointer (RFC 6901) and returns its reference tokens, unescaped (`~1` is `/`,
/// `~0` is `~`).
fn json_pointer(lit: &LitStr) -> syn::Result<Vec<String>> {
    let written = lit.value();
    let refuse = |why: String| Err(syn::Error::new(lit.span(), why));
    if written.is_empty() {
        return refuse(
            "the empty JSON pointer names the whole body, and leaving it all out would make \
             every request with one key the same: name members, such as \"/client_ts\""
                .to_owned(),
        );
    }
    let Some(rest) = written.strip_prefix('/') else {
        return refuse(format!(
            "\"{written}\" is not a JSON pointer (RFC 6901): a pointer starts with `/`, as in \
             \"/{written}\""
        ));
    };
    let mut tokens = Vec::new();
    for token in rest.split('/') {
        let mut unescaped = String::with_capacity(token.len());
        let mut chars = token.chars();
        while let Some(c) = chars.next() {
            if c != '~' {
                unescaped.push(c);
                continue;
            }
            match chars.next() {
                Some('0') => unescaped.push('~'),
                Some('1') => unescaped.push('/'),
                _ => {
                    return refuse(format!(
                        "\"{written}\" is not a JSON pointer (RFC 6901): `~` is an escape, `~0` \
                         for `~` and `~1` for `/`"
                    ))
                }
            }
        }
        // `-` (RFC 6901's element after an array's end) names no element of a body; it stays a
        // valid pointer, since in an object it is the member named `-`.
        tokens.push(unescaped);
    }
    Ok(tokens)
}

/// A flag takes no value: `require_key`, never `require_key = true`.
fn flag(input: ParseStream<'_>, name: &str) -> syn::Result<()> {
    if input.is_empty() || input.peek(Token![,]) {
        return Ok(());
    }
    Err(syn::Error::new_spanned(
        rest_of_argument(input)?,
        format!("`{name}` is a flag and takes no value: write `{name}` alone to turn it on, or leave it out"),
    ))
}

/// The tokens up to the next top-level comma, for an error that covers a whole bad value.
fn rest_of_argument(input: ParseStream<'_>) -> syn::Result<TokenStream> {
    input.step(|cursor| {
        let mut rest = *cursor;
        let mut tokens = TokenStream::new();
        while let Some((tt, next)) = rest.token_tree() {
            if matches!(&tt, TokenTree::Punct(p) if p.as_char() == ',') {
                break;
            }
            tokens.extend([tt]);
            rest = next;
        }
        if tokens.is_empty() {
            // Nothing after `=`: point at what follows (a comma or the closing parenthesis).
            return Err(cursor.error("expected a value after `=`"));
        }
        Ok((tokens, rest))
    })
}

/// Checks a header name against RFC 9110's `token` grammar, as the runtime's `HeaderName` will.
fn header_name(lit: &LitStr) -> syn::Result<()> {
    let name = lit.value();
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() {
        return Err(syn::Error::new(
            lit.span(),
            "the header name is empty: name the header that carries the key, for example \
             `header = \"X-Request-Id\"`",
        ));
    }
    let bad = match name.chars().find(|c| !tchar(*c)) {
        None => return Ok(()),
        Some(' ') => "a space".to_owned(),
        Some(c) => format!("{c:?}"),
    };
    Err(syn::Error::new(
        lit.span(),
        format!(
            "\"{name}\" is not a valid HTTP header name: it contains {bad}; use only ASCII \
             letters, digits and ! # $ % & ' * + - . ^ _ ` | ~ (an RFC 9110 token)"
        ),
    ))
}

/// "unknown argument `tll`; expected one of: `ttl`, ... (did you mean `ttl`?)".
fn unknown_argument(unknown: &Ident, expected: syn::Error) -> syn::Error {
    let written = unknown.unraw().to_string();
    let suggestion = NAMES
        .iter()
        .map(|name| (edit_distance(&written, name), name))
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, name)| format!(" (did you mean `{name}`?)"))
        .unwrap_or_default();
    syn::Error::new(
        unknown.span(),
        format!("unknown argument `{written}`; {expected}{suggestion}"),
    )
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(tokens: &str) -> syn::Result<Args> {
        syn::parse_str::<Args>(tokens)
    }

    fn error(tokens: &str) -> String {
        match parse(tokens) {
            Ok(_) => panic!("`{tokens}` parsed"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn empty_and_trailing_comma() {
        assert!(parse("").is_ok());
        assert!(parse("require_key,").is_ok());
    }

    #[test]
    fn every_argument() {
        let args = parse(
            r#"ttl = "1h", lease = "10s", require_key, header = "X-Request-Id",
               scope = crate::AuthUser, wait = "2s", fail_open, store_server_errors,
               max_body = "64KiB""#,
        );
        let Ok(args) = args else {
            panic!("did not parse");
        };
        assert_eq!(args.ttl.map(|d| d.value), Some(3_600_000));
        assert_eq!(args.lease.map(|d| d.value), Some(10_000));
        assert!(args.require_key.is_some());
        assert_eq!(
            args.header.map(|h| h.value()).as_deref(),
            Some("X-Request-Id")
        );
        assert!(args.scope.is_some());
        assert_eq!(args.wait.map(|d| d.value), Some(2_000));
        assert!(args.fail_open.is_some());
        assert!(args.store_server_errors.is_some());
        assert_eq!(args.max_body.map(|d| d.value), Some(65_536));
    }

    #[test]
    fn each_duplicate_is_named() {
        for (name, once) in [
            ("ttl", r#"ttl = "1h""#),
            ("lease", r#"lease = "1s""#),
            ("require_key", "require_key"),
            ("header", r#"header = "X-Key""#),
            ("scope", "scope = A"),
            ("wait", r#"wait = "1s""#),
            ("fail_open", "fail_open"),
            ("store_server_errors", "store_server_errors"),
            ("max_body", "max_body = 10"),
            ("fingerprint", r#"fingerprint = "json""#),
            ("ignore", r#"ignore = ["/a"]"#),
        ] {
            assert_eq!(
                error(&format!("{once}, {once}")),
                format!("`{name}` set multiple times; keep only one")
            );
        }
    }

    #[test]
    fn unknown_arguments_list_the_known_ones() {
        let message = error(r#"tll = "1h""#);
        assert!(message.starts_with("unknown argument `tll`; expected one of: `ttl`, `lease`"));
        assert!(message.ends_with("(did you mean `ttl`?)"), "{message}");
        assert!(!error("type = 1").contains("did you mean"));
    }

    #[test]
    fn lease_against_ttl() {
        assert!(parse(r#"lease = "59m", ttl = "1h""#).is_ok());
        assert!(error(r#"lease = "1h", ttl = "1h""#).contains("must be shorter than `ttl`"));
        assert!(error(r#"lease = "24h""#).contains("the default `ttl` (24h)"));
        assert!(parse(r#"lease = "23h59m""#).is_ok());
    }

    #[test]
    fn header_names() {
        assert!(parse(r#"header = "x-request-id""#).is_ok());
        assert!(error(r#"header = """#).contains("empty"));
        assert!(error(r#"header = "X Key""#).contains("contains a space"));
        assert!(error(r#"header = "X:Key""#).contains("contains ':'"));
        assert!(error(r#"header = "Schlüssel""#).contains("contains 'ü'"));
    }

    #[test]
    fn flags_take_no_value() {
        assert!(error("require_key = true").starts_with("`require_key` is a flag"));
        assert!(error("fail_open(true)").starts_with("`fail_open` is a flag"));
    }

    #[test]
    fn values_have_the_right_shape() {
        assert!(error("ttl").starts_with("`ttl` needs a value"));
        assert!(error("ttl = 24").starts_with("`ttl` takes a duration string"));
        assert!(error("ttl = ,").contains("expected a value"));
        assert!(error("max_body = 0").contains("larger than zero"));
        assert!(error("max_body = 10u8").contains("is a `usize`"));
        assert!(error("max_body = true").starts_with("`max_body` takes a size"));
        assert!(error(r#"ttl = "24 hours""#).starts_with(r#"`ttl`: "24 hours" is not a duration"#));
        assert!(error("header = X").starts_with("`header` takes a string"));
    }

    #[test]
    fn fingerprint_modes() {
        let json = parse(
            r#"fingerprint = "json", ignore = ["/client_ts", "/trace/id", "/a~1b~0c", "/items/0", "/"]"#,
        );
        let Ok(json) = json else {
            panic!("did not parse");
        };
        assert_eq!(json.fingerprint.map(|f| f.value), Some(Fingerprint::Json));
        let tokens: Vec<Vec<String>> = json
            .ignore
            .map(|i| i.pointers.into_iter().map(|(_, t)| t).collect())
            .unwrap_or_default();
        assert_eq!(
            tokens,
            [
                vec!["client_ts"],
                vec!["trace", "id"],
                vec!["a/b~c"],
                vec!["items", "0"],
                vec![""],
            ]
        );
        // `ignore` may come first.
        assert!(parse(r#"ignore = ["/a"], fingerprint = "json""#).is_ok());
        assert!(parse(r#"fingerprint = "raw""#).is_ok());
        assert!(error(r#"fingerprint = "JSON""#).contains(r#"not "JSON""#));
        assert!(error("fingerprint = json").starts_with("`fingerprint` takes a string"));
        assert!(error(r#"ignore = ["/a"]"#).contains(r#"needs `fingerprint = "json"`"#));
        assert!(error(r#"fingerprint = "raw", ignore = ["/a"]"#).contains("needs"));
    }

    #[test]
    fn ignored_pointers_are_checked() {
        let json = |ignore: &str| error(&format!(r#"fingerprint = "json", ignore = {ignore}"#));
        assert!(json("[]").contains("lists no pointer"));
        assert!(json(r#""/a""#).contains("takes a list of JSON pointers"));
        assert!(json("[a]").contains("as strings"));
        assert!(json(r#"[""]"#).contains("names the whole body"));
        assert!(json(r#"["a"]"#).contains(r#"starts with `/`, as in "/a""#));
        assert!(json(r#"["/a~2"]"#).contains("`~0` for `~`"));
        assert!(json(r#"["/a~"]"#).contains("`~0` for `~`"));
        assert!(parse(r#"fingerprint = "json", ignore = ["/items/-"]"#).is_ok());
        assert!(json(r#"["/a", "/a"]"#).contains(r#""/a" is listed twice"#));
        assert!(json(r#"["/a~1b", "/a~1b"]"#).contains("listed twice"));
        assert!(json(r#"["/trace", "/trace/id"]"#).contains(r#""/trace/id" is inside "/trace""#));
        assert!(json(r#"["/trace/id", "/trace"]"#).contains(r#""/trace/id" is inside "/trace""#));
        // Siblings and a name that merely starts like another are fine.
        assert!(
            parse(r#"fingerprint = "json", ignore = ["/a/b", "/a/c", "/ab", "/a~1b"]"#).is_ok()
        );
    }

    #[test]
    fn distances() {
        assert_eq!(edit_distance("ttl", "ttl"), 0);
        assert_eq!(edit_distance("tll", "ttl"), 1);
        assert_eq!(edit_distance("require_keys", "require_key"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
