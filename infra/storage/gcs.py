"""Google Cloud Storage (gs://bucket/key) through its S3-compatible XML API: the S3 backend with
GCS's endpoint, path-style requests and HMAC keys (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY set
to a GCS HMAC key: https://cloud.google.com/storage/docs/authentication/hmackeys).

`storage.endpoint_url` overrides the endpoint (a private one, or any S3-compatible server in tests).
GCS honours If-None-Match on upload but not the S3 If-Match conditions the lock's takeover needs on
every bucket configuration: check your bucket with tests/test_lock.py's pattern before relying on
two schedulers writing one gs:// output.
"""

from __future__ import annotations

import dataclasses

from mergeflow.infra.storage import StorageOptions
from mergeflow.infra.storage.s3 import S3Storage

ENDPOINT = "https://storage.googleapis.com"


class GcsStorage(S3Storage):
    scheme = "gs"

    @classmethod
    def _client_options(cls, options: StorageOptions) -> StorageOptions:
        return dataclasses.replace(
            options, endpoint_url=options.endpoint_url or ENDPOINT, region=options.region or "auto"
        )
