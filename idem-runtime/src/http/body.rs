//! Bodies: the request body read once (fingerprinted as it arrives, within a limit) and the
//! response body collected for storage (within a limit, or streamed on unstored).

use std::{future::poll_fn, pin::Pin};

use actix_web::{
    body::{BodySize, BodyStream, BoxBody, MessageBody},
    web,
};
use bytes::{Bytes, BytesMut};
use futures_util::{stream, StreamExt as _};

use crate::{fingerprint::FingerprintHasher, problem::Problem};

/// Reads the whole request body, feeding `hasher` chunk by chunk; more than `limit` bytes is a
/// 413 and stops reading at once.
pub(crate) async fn read_request(
    payload: &mut web::Payload,
    limit: usize,
    hasher: &mut FingerprintHasher,
) -> Result<Bytes, Problem> {
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    let mut len = 0usize;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|err| {
            tracing::debug!(error = %err, "request body unreadable");
            Problem::BadBody
        })?;
        len += chunk.len();
        if len > limit {
            return Err(Problem::BodyTooLarge { limit });
        }
        hasher.update(&chunk);
        match &first {
            None => first = Some(chunk),
            Some(head) => {
                if rest.is_empty() {
                    rest.extend_from_slice(head);
                }
                rest.extend_from_slice(&chunk);
            }
        }
    }
    Ok(if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        rest.freeze()
    })
}

/// A response body, read for storage.
pub(crate) enum Collected {
    /// The whole body, within the limit.
    Whole(Bytes),
    /// Over the limit: the chunks read so far and the rest, to be sent but not stored.
    TooLarge(Vec<Bytes>, BoxBody),
    /// The body failed while it was read.
    Failed,
}

/// Reads a response body up to `limit` bytes.
pub(crate) async fn collect_response(body: BoxBody, limit: usize) -> Collected {
    let body = match body.try_into_bytes() {
        Ok(bytes) if bytes.len() <= limit => return Collected::Whole(bytes),
        Ok(bytes) => return Collected::TooLarge(vec![bytes], BoxBody::new(())),
        Err(body) => body,
    };
    if let BodySize::Sized(n) = body.size() {
        if n > limit as u64 {
            return Collected::TooLarge(Vec::new(), body);
        }
    }
    let mut body = Box::pin(body);
    let mut chunks = Vec::new();
    let mut len = 0usize;
    loop {
        match poll_fn(|cx| body.as_mut().poll_next(cx)).await {
            None => break,
            Some(Ok(chunk)) => {
                len += chunk.len();
                chunks.push(chunk);
                if len > limit {
                    return Collected::TooLarge(
                        chunks,
                        BoxBody::new(BodyStream::new(stream_of(body))),
                    );
                }
            }
            Some(Err(err)) => {
                tracing::debug!(error = %err, "response body error");
                return Collected::Failed;
            }
        }
    }
    let mut out = BytesMut::with_capacity(len);
    for chunk in chunks {
        out.extend_from_slice(&chunk);
    }
    Collected::Whole(out.freeze())
}

/// The body of a response too large to store: the chunks already read, then the rest.
pub(crate) fn unstored(head: Vec<Bytes>, rest: BoxBody) -> BoxBody {
    let stream = stream::iter(head.into_iter().map(Ok)).chain(stream_of(Box::pin(rest)));
    BoxBody::new(BodyStream::new(stream))
}

type BodyError = Box<dyn std::error::Error>;

fn stream_of(
    mut body: Pin<Box<BoxBody>>,
) -> impl futures_util::Stream<Item = Result<Bytes, BodyError>> {
    stream::poll_fn(move |cx| body.as_mut().poll_next(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> BoxBody {
        let parts: Vec<Result<Bytes, std::io::Error>> =
            parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        BoxBody::new(BodyStream::new(stream::iter(parts)))
    }

    #[actix_rt::test]
    async fn a_streamed_body_within_the_limit_is_collected_whole() {
        match collect_response(chunks(&[b"ab", b"cd"]), 4).await {
            Collected::Whole(bytes) => assert_eq!(bytes, "abcd"),
            _ => panic!("expected the whole body"),
        }
    }

    #[actix_rt::test]
    async fn a_body_over_the_limit_is_sent_whole_but_not_collected() {
        let Collected::TooLarge(head, rest) =
            collect_response(chunks(&[b"ab", b"cd", b"ef"]), 3).await
        else {
            panic!("expected too large");
        };
        let sent = actix_web::body::to_bytes(unstored(head, rest))
            .await
            .map_err(|_| "body")
            .expect("reads");
        assert_eq!(sent, "abcdef");
        assert!(matches!(
            collect_response(BoxBody::new(Bytes::from_static(b"abcd")), 3).await,
            Collected::TooLarge(..)
        ));
    }
}
