"""The faces the service shows to applications: each turns its wire protocol into the pipeline's
`Request` and the pipeline's `Delta`/`Result` back into its own messages. gRPC today (`grpc/`)."""
