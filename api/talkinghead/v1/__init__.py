"""The talkinghead.v1 gRPC API, generated from proto/ by `make protos` (do not edit); imported by the server (service/) and the client (client/)."""
