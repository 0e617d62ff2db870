//! `Subscribe` served with its own codec, so a delivery's shared encoding is written straight
//! into the stream (see [`super::delivery`]).
//!
//! The generated `BrokerServer` encodes every stream item with prost, from a `SubscribeEvent`
//! value: that would mean rebuilding the message for every subscriber. [`BrokerRoutes`] wraps the
//! generated server, takes the one `Subscribe` path and serves it with [`SubscribeCodec`], whose
//! encoder writes [`Outgoing`] items (shared bytes plus per-delivery fields); every other call
//! goes to the generated server unchanged. The bytes on the wire are a `SubscribeEvent` either
//! way, so clients see no difference.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::Stream;
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::broker_server::BrokerServer;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::{NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use super::BrokerService;
use crate::fanout::outgoing::Outgoing;

const SUBSCRIBE_PATH: &str = "/switchboard.v1.Broker/Subscribe";

/// Encodes [`Outgoing`] items and decodes `SubscribeRequest`s.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SubscribeCodec;

/// The encoding half of [`SubscribeCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OutgoingEncoder;

/// The decoding half of [`SubscribeCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SubscribeRequestDecoder;

impl Codec for SubscribeCodec {
    type Encode = Outgoing;
    type Decode = pb::SubscribeRequest;
    type Encoder = OutgoingEncoder;
    type Decoder = SubscribeRequestDecoder;

    fn encoder(&mut self) -> OutgoingEncoder {
        OutgoingEncoder
    }

    fn decoder(&mut self) -> SubscribeRequestDecoder {
        SubscribeRequestDecoder
    }
}

impl Encoder for OutgoingEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        super::delivery::encode(&item, dst)
    }
}

impl Decoder for SubscribeRequestDecoder {
    type Item = pb::SubscribeRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<pb::SubscribeRequest>, Status> {
        switchboard_proto::codec::decode_request(src).map(Some)
    }
}

/// The stream `Subscribe` returns when served through [`BrokerRoutes`].
pub(crate) type OutgoingStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<Outgoing, Status>> + Send>>;

struct SubscribeSvc(BrokerService);

impl ServerStreamingService<pb::SubscribeRequest> for SubscribeSvc {
    type Response = Outgoing;
    type ResponseStream = OutgoingStream;
    type Future = BoxFuture<Response<OutgoingStream>, Status>;

    fn call(&mut self, request: Request<pb::SubscribeRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.subscribe_outgoing(request).await })
    }
}

/// The `switchboard.v1.Broker` service: the generated server, with `Subscribe` taken over.
#[derive(Clone)]
pub(crate) struct BrokerRoutes {
    service: BrokerService,
    generated: BrokerServer<BrokerService>,
    max_decoding_message_size: usize,
}

impl BrokerRoutes {
    /// Serves `service`; requests larger than `max_decoding_message_size` bytes are refused.
    pub(crate) fn new(service: BrokerService, max_decoding_message_size: usize) -> BrokerRoutes {
        BrokerRoutes {
            generated: BrokerServer::new(service.clone())
                .max_decoding_message_size(max_decoding_message_size),
            service,
            max_decoding_message_size,
        }
    }
}

impl NamedService for BrokerRoutes {
    const NAME: &'static str = <BrokerServer<BrokerService> as NamedService>::NAME;
}

impl Service<http::Request<tonic::body::Body>> for BrokerRoutes {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != SUBSCRIBE_PATH {
            return self.generated.call(request);
        }
        let service = SubscribeSvc(self.service.clone());
        let max_decoding = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(SubscribeCodec)
                .apply_max_message_size_config(Some(max_decoding), None);
            Ok(grpc.server_streaming(service, request).await)
        })
    }
}
