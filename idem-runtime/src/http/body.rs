//! Bodies: the request body read once (fingerprinted as it arrives, within a limit) and handed
//! on to the handler's extractors in bounded chunks, and the response body collected for storage
//! (within a limit, or streamed on unstored).

use std::{future::poll_fn, pin::Pin};

use actix_web::{
    body::{BodySize, BodyStream, BoxBody, MessageBody},
    dev::Payload,
    error::PayloadError,
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

/// The size of the chunks [`payload_of`] hands the body on in. actix-http's `Decoder` inflates a
/// compressed body one input chunk at a time, the whole chunk at once (in place below 2049 bytes,
/// on a blocking thread above), and the extractors' limits (`web::Json`'s 2 MiB, `web::Bytes`'s
/// 256 KiB) only see what it hands them. 2 KiB stays in place, and at deflate's largest ratio
/// (about 1032:1) inflates to at most about 2 MiB before an extractor can refuse it: the same
/// order as plain actix-web, whose HTTP/1 reads arrive in chunks of a few KiB.
pub(crate) const PAYLOAD_CHUNK: usize = 2048;

/// The payload the handler's own extractors read: the body read by [`read_request`], as a stream
/// of zero-copy slices of at most [`PAYLOAD_CHUNK`] bytes. One chunk of the whole body would be
/// inflated whole (a 1 MiB gzip body can hold 1 GiB) before any extractor limit applies.
pub(crate) fn payload_of(body: Bytes) -> Payload {
    if body.len() <= PAYLOAD_CHUNK {
        // Already one bounded chunk: no stream to box.
        return Payload::from(body);
    }
    let chunks = body.len().div_ceil(PAYLOAD_CHUNK);
    let slices = stream::iter((0..chunks).map(move |i| {
        let start = i * PAYLOAD_CHUNK;
        Ok::<_, PayloadError>(body.slice(start..body.len().min(start + PAYLOAD_CHUNK)))
    }));
    Payload::Stream {
        payload: Box::pin(slices),
    }
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
    async fn the_payload_is_the_body_in_bounded_zero_copy_chunks() {
        let body = Bytes::from(vec![7u8; 2 * PAYLOAD_CHUNK + 5]);
        let Payload::Stream { payload } = payload_of(body.clone()) else {
            panic!("expected a stream payload");
        };
        let chunks: Vec<Bytes> = payload.map(|c| c.expect("chunk")).collect().await;
        let sizes: Vec<usize> = chunks.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [PAYLOAD_CHUNK, PAYLOAD_CHUNK, 5]);
        assert_eq!(chunks.concat(), body);
        assert_eq!(
            chunks[1].as_ptr(),
            body[PAYLOAD_CHUNK..].as_ptr(),
            "a slice, not a copy"
        );
        // A body of one chunk at most is handed on as it is, with no stream to box.
        for small in [Bytes::new(), Bytes::from(vec![7u8; PAYLOAD_CHUNK])] {
            let chunks: Vec<Bytes> = payload_of(small.clone())
                .map(|c| c.expect("chunk"))
                .collect()
                .await;
            assert!(chunks.iter().all(|c| c.len() <= PAYLOAD_CHUNK));
            assert_eq!(chunks.concat(), small);
        }
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
