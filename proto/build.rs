//! Compiles `switchboard/v1/*.proto` and `switchboard/internal/v1/*.proto` with protox (pure Rust), so building needs no system `protoc`.
use prost::Message;

const PROTOS: &[&str] = &[
    "switchboard/v1/auth.proto",
    "switchboard/v1/broker.proto",
    "switchboard/v1/entity.proto",
    "switchboard/v1/cluster.proto",
    "switchboard/v1/schema.proto",
    "switchboard/v1/kpi.proto",
    "switchboard/v1/reason.proto",
];

/// Node-to-node RPC: compiled separately so reflection on the public listener does not list it.
const INTERNAL_PROTOS: &[&str] = &["switchboard/internal/v1/raft.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(PROTOS, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for server reflection, so grpcurl works without the .proto files.
    std::fs::write(out.join("switchboard_descriptor.bin"), fds.encode_to_vec())?;
    // Messages and clients: clients decode with prost's stock codec.
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        // Payloads are `bytes::Bytes`: one reference-counted copy from decode to every subscriber.
        .bytes(".switchboard.v1")
        .compile_fds(fds.clone())?;
    // Servers, apart (in `server/`, over the messages above): they decode requests with
    // `RequestCodec`, which refuses a request that is not valid protobuf with INVALID_ARGUMENT
    // and a reason, where prost's codec answers INTERNAL. A client decoding a broken response is
    // not a bad request, so clients keep the stock codec.
    let server_out = out.join("server");
    std::fs::create_dir_all(&server_out)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .out_dir(&server_out)
        .extern_path(".switchboard.v1", "crate::v1")
        .codec_path("crate::codec::RequestCodec")
        .compile_fds(fds)?;
    let internal = protox::compile(INTERNAL_PROTOS, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".switchboard.internal.v1")
        .compile_fds(internal)?;
    for proto in PROTOS.iter().chain(INTERNAL_PROTOS) {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
