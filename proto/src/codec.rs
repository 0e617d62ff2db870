//! How the generated servers decode requests: prost's codec, except for what a request that does
//! not decode gets.
//!
//! tonic's stock codec answers a body that is not valid protobuf of the method's request type (a
//! truncated field, a wrong wire type, invalid UTF-8 in a string field) with INTERNAL, as if the
//! server had failed. It is the client's mistake: [`RequestCodec`] answers INVALID_ARGUMENT with
//! the reason [`Reason::MalformedRequest`] in a `google.rpc.ErrorInfo`, like every other refusal
//! (`docs/ERRORS.md`). The build (`build.rs`) names it as the servers' codec; the clients keep
//! prost's, since a response that does not decode is no bad request.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::ProstEncoder;
use tonic_types::{ErrorDetails, StatusExt};

use crate::{Reason, ERROR_DOMAIN};

/// The refusal of a request that is not what its method takes: INVALID_ARGUMENT,
/// [`Reason::MalformedRequest`], saying `what`.
pub fn malformed_request(what: impl fmt::Display) -> Status {
    let details = ErrorDetails::with_error_info(
        Reason::MalformedRequest.as_str(),
        ERROR_DOMAIN,
        HashMap::new(),
    );
    Status::with_error_details(Code::InvalidArgument, what.to_string(), details)
}

/// Decodes one request message; a body that is not a valid `U` is [`malformed_request`].
///
/// # Errors
/// The body does not decode as a `U`.
pub fn decode_request<U: Message + Default>(src: &mut DecodeBuf<'_>) -> Result<U, Status> {
    U::decode(src).map_err(|e| malformed_request(format!("the request is not valid protobuf: {e}")))
}

/// prost's codec for a server: encodes responses `T` as prost does, decodes requests `U` with
/// [`decode_request`].
#[derive(Debug, Clone)]
pub struct RequestCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        RequestCodec {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> RequestDecoder<U> {
        RequestDecoder { _type: PhantomData }
    }
}

/// The decoding half of [`RequestCodec`].
#[derive(Debug, Clone)]
pub struct RequestDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode_request(src).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_request_is_invalid_argument_with_its_reason() {
        let status = malformed_request("field 1 is truncated");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "field 1 is truncated");
        let info = status.get_details_error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, "MALFORMED_REQUEST");
        assert_eq!(info.domain, ERROR_DOMAIN);
    }
}
