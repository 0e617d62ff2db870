"""Generated gRPC stubs for Switchboard's contract (proto/switchboard/v1). Do not edit."""
