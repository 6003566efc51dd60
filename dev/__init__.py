"""Development and benchmark code, outside the runtime: synthetic checkpoint families, the digits
suite, local S3/MLflow services and a multi-node Ray cluster on one machine."""
