"""Architecture adapters: one per model family, each turning a torch model into a `CodecSpec`."""
