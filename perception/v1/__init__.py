"""Generated gRPC/protobuf stubs for ``proto/perception/v1`` (run ``make proto``)."""
