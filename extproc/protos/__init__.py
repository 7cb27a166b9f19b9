"""This project's own protobuf messages: the Python code generated from protos/ (see codegen)."""
