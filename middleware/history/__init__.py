"""History of attribute values: recorded with each entity change, read by the temporal API, forwarded to sinks."""
