"""The wire contract: generated protobuf/gRPC code under ``protos.fedcoord.v1`` and the codec."""
