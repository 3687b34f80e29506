"""tokenmill.api: the router and the HTTP (TGI, OpenAI) and gRPC surfaces."""
