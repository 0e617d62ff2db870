//! Checks on a gRPC call's shape that tonic does not make, before tonic sees the call.
//!
//! - **Metadata size.** HTTP/2 itself can only refuse a header list over its limit by resetting
//!   the stream with HTTP 431 (which gRPC clients report as `UNKNOWN`) or, for a block that spans
//!   CONTINUATION frames, by closing the whole connection (GOAWAY), ending every other call on it.
//!   So HTTP/2 is told to accept four times `limits.max_metadata_bytes` (`server.rs`), and the
//!   limit itself is enforced here: a call over it gets INVALID_ARGUMENT `METADATA_TOO_LARGE`,
//!   and the connection's other calls go on.
//! - **One request message per unary call.** tonic decodes the first message of a unary call
//!   (or of a server-streaming one) and drops any that follow; a client that sent two would see
//!   the first stored and the second silently lost. The body of such a call is watched, and a
//!   second message refuses the call with INVALID_ARGUMENT `MALFORMED_REQUEST` before the handler
//!   runs.
//!
//! Only native gRPC calls are checked (`application/grpc`, `application/grpc+proto`): gRPC-Web
//! frames its body differently (base64 in `grpc-web-text`), and the browser gateway's requests are
//! not gRPC at all.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prost::Message as _;
use tonic::Status;

use crate::error::{BrokerError, Reason};

/// HTTP/2 counts each header list entry as its name, its value and 32 bytes (RFC 9113 §6.5.2).
const HEADER_ENTRY_OVERHEAD: usize = 32;

/// What the guard checks against; cheap to clone.
#[derive(Clone)]
pub(crate) struct GrpcGuard {
    inner: Arc<Inner>,
}

struct Inner {
    max_metadata_bytes: usize,
    /// The paths (`/package.Service/Method`) of the methods that take one request message.
    single_request_paths: HashSet<String>,
}

impl GrpcGuard {
    /// A guard for `max_metadata_bytes`, knowing the methods of the services described by
    /// `descriptor_sets` (encoded `FileDescriptorSet`s).
    ///
    /// # Errors
    /// A descriptor set does not decode (a build mistake).
    pub(crate) fn new(
        max_metadata_bytes: usize,
        descriptor_sets: &[&[u8]],
    ) -> anyhow::Result<GrpcGuard> {
        let mut single_request_paths = HashSet::new();
        for encoded in descriptor_sets {
            let set = prost_types::FileDescriptorSet::decode(*encoded)
                .context("cannot decode a service descriptor set")?;
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    for method in &service.method {
                        if !method.client_streaming() {
                            let service = match package {
                                "" => service.name().to_owned(),
                                package => format!("{package}.{}", service.name()),
                            };
                            single_request_paths.insert(format!("/{service}/{}", method.name()));
                        }
                    }
                }
            }
        }
        Ok(GrpcGuard {
            inner: Arc::new(Inner {
                max_metadata_bytes,
                single_request_paths,
            }),
        })
    }

    /// The middleware: wraps the gRPC routes (`axum::middleware::from_fn_with_state`).
    pub(crate) async fn check(
        State(guard): State<GrpcGuard>,
        request: Request,
        next: Next,
    ) -> Response {
        if !is_native_grpc(&request) {
            return next.run(request).await;
        }
        let size = metadata_size(&request);
        let max = guard.inner.max_metadata_bytes;
        if size > max {
            return Status::from(BrokerError::invalid(
                Reason::MetadataTooLarge,
                format!(
                    "the call's metadata takes {size} bytes (name + value + 32 per entry); the \
                     limit is {max} (limits.max_metadata_bytes)"
                ),
            ))
            .into_http();
        }
        if !guard
            .inner
            .single_request_paths
            .contains(request.uri().path())
        {
            return next.run(request).await;
        }
        let (parts, body) = request.into_parts();
        let body = Body::new(SingleMessage {
            inner: body,
            frames: MessageFrames::default(),
            refused: false,
        });
        next.run(Request::from_parts(parts, body)).await
    }
}

fn is_native_grpc(request: &Request) -> bool {
    let Some(content_type) = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    content_type == "application/grpc"
        || content_type.starts_with("application/grpc+")
        || content_type.starts_with("application/grpc;")
}

/// The request's header list size as HTTP/2 counts it, pseudo-headers included.
fn metadata_size(request: &Request) -> usize {
    let entry = |name: usize, value: usize| name + value + HEADER_ENTRY_OVERHEAD;
    let uri = request.uri();
    let pseudo = entry(":method".len(), request.method().as_str().len())
        + entry(
            ":path".len(),
            uri.path_and_query().map_or(0, |p| p.as_str().len()),
        )
        + uri
            .scheme_str()
            .map_or(0, |s| entry(":scheme".len(), s.len()))
        + uri
            .authority()
            .map_or(0, |a| entry(":authority".len(), a.as_str().len()));
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| entry(name.as_str().len(), value.len()))
        .sum();
    pseudo + headers
}

/// Follows the gRPC message framing of a request body (a flag byte, a 4-byte big-endian length,
/// the message), to tell when a second message begins.
#[derive(Debug, Default)]
struct MessageFrames {
    /// Messages begun so far.
    begun: u32,
    /// Bytes of the current 5-byte prefix read so far (0 between messages).
    prefix_read: usize,
    /// The length bytes of the current prefix.
    length: [u8; 4],
    /// Bytes of the current message still to come.
    remaining: u64,
}

/// A second message began.
#[derive(Debug, PartialEq, Eq)]
struct SecondMessage;

impl MessageFrames {
    fn feed(&mut self, mut data: &[u8]) -> Result<(), SecondMessage> {
        while let Some((&byte, rest)) = data.split_first() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.remaining -= skip as u64;
                data = &data[skip..];
                continue;
            }
            if self.prefix_read == 0 {
                if self.begun > 0 {
                    return Err(SecondMessage);
                }
                self.begun += 1;
            } else {
                self.length[self.prefix_read - 1] = byte;
            }
            self.prefix_read += 1;
            if self.prefix_read == 5 {
                self.remaining = u64::from(u32::from_be_bytes(self.length));
                self.prefix_read = 0;
            }
            data = rest;
        }
        Ok(())
    }
}

/// A unary call's body, refused (as a body error carrying the status, which tonic answers with)
/// as soon as a second message begins.
struct SingleMessage {
    inner: Body,
    frames: MessageFrames,
    refused: bool,
}

impl HttpBody for SingleMessage {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        if self.refused {
            return Poll::Ready(None);
        }
        let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            if self.frames.feed(data).is_err() {
                self.refused = true;
                let status = Status::from(BrokerError::invalid(
                    Reason::MalformedRequest,
                    "a unary call carries one request message; this one carries more",
                ));
                return Poll::Ready(Some(Err(Box::new(status))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend(std::iter::repeat_n(7, len as usize));
        out
    }

    #[test]
    fn one_message_passes_however_it_is_split() {
        let body = message(300);
        for chunk in [1, 2, 5, 7, 300, 1000] {
            let mut frames = MessageFrames::default();
            for part in body.chunks(chunk) {
                assert_eq!(frames.feed(part), Ok(()), "chunks of {chunk}");
            }
        }
        let mut frames = MessageFrames::default();
        assert_eq!(frames.feed(&message(0)), Ok(()), "an empty message");
    }

    #[test]
    fn a_second_message_is_caught_however_it_is_split() {
        let mut body = message(10);
        body.extend(message(0));
        for chunk in [1, 3, 15, 16, 100] {
            let mut frames = MessageFrames::default();
            let caught = body.chunks(chunk).any(|part| frames.feed(part).is_err());
            assert!(caught, "chunks of {chunk}");
        }
    }

    #[test]
    fn unary_paths_come_from_the_descriptors() {
        let guard = GrpcGuard::new(1024, &[switchboard_proto::FILE_DESCRIPTOR_SET]).unwrap();
        let paths = &guard.inner.single_request_paths;
        assert!(paths.contains("/switchboard.v1.Broker/Publish"));
        assert!(paths.contains("/switchboard.v1.Broker/Subscribe"));
        assert!(paths.contains("/switchboard.v1.Entities/UpdateEntity"));
        assert!(!paths.contains("/switchboard.v1.Broker/PublishStream"));
    }
}
