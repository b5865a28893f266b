"""`S3Store`: the object store on S3 or an S3-compatible service, over boto3.

Owns the translation between the `ObjectStore` contract and the S3 API: key
prefixing, ranged GET, conditional PUT (If-None-Match: * and If-Match, boto3
>= 1.35), multipart upload of large objects, paginated LIST, and the mapping
of S3 and transport errors onto the store's error classes.

Invariants:
- Every botocore error leaves this module as a StoreError subclass: 404 /
  NoSuchKey -> NotFound; 412, 409 ConditionalRequestConflict ->
  PreconditionFailed; connection errors, timeouts, 5xx, 429, throttling ->
  StoreUnavailable; the rest (403, NoSuchBucket, bad credentials) -> StoreError.
- Conditional PUTs go through a client with retries off. botocore retries a
  PUT whose reply was lost; if the first attempt had landed, the retry
  fails its own condition and the caller would see PreconditionFailed for
  a write that in fact succeeded. With one attempt the caller sees
  StoreUnavailable, which the contract defines as "outcome unknown".
- A conditional PUT with If-Match is always a single PUT (up to 5 GiB). Above
  the multipart threshold, If-None-Match is sent on CompleteMultipartUpload;
  If-Match on CompleteMultipartUpload is not used because moto (our test
  peer) does not enforce it, so it could not be tested, and the only object
  glidefs compare-and-swaps (the manifest root) is small.
- A conditional DELETE (if_unmodified_since) is a HEAD, a comparison, then
  an unconditional DELETE. S3 has If-Match on DeleteObject, but an ETag
  cannot see an identical re-upload (same bytes, same ETag), which is the
  one rewrite GC has to notice; the time condition it has,
  x-amz-if-match-last-modified-time, works on directory buckets only, and
  moto ignores it. So a PUT that lands between this HEAD and this DELETE is
  deleted: a window of one DELETE round trip (see glide/repo/gc.py).
- Last-Modified has whole-second resolution (HEAD sends an HTTP date, LIST
  a time ending in .000Z): an object can look up to 1 s older than it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any, Final, Literal

import boto3
import botocore.config
import botocore.exceptions

from glide.store.base import (
    Data,
    NotFound,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
    StoreUnsafe,
    as_bytes,
    validate_list_prefix,
    validate_range,
    validate_since,
)

MiB: Final = 1 << 20
# S3's limits: one PUT up to 5 GiB; multipart parts 5 MiB..5 GiB, at most
# 10,000 of them; LIST pages at most 1000 keys.
MAX_SINGLE_PUT: Final = 5 * 1024 * MiB
MIN_PART_SIZE: Final = 5 * MiB
MAX_PARTS: Final = 10_000
MAX_LIST_PAGE: Final = 1000

# Error codes that mean "try again later" even without a 5xx status.
_TRANSIENT_CODES: Final = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequests", "RequestTimeout", "InternalError", "ServiceUnavailable",
    "OperationAborted",
})
_NOT_FOUND_CODES: Final = frozenset({"NoSuchKey", "NotFound", "404"})
_TRANSIENT_BOTO_ERRORS: Final = (
    botocore.exceptions.ConnectionError,  # connect errors and timeouts, TLS, proxy
    botocore.exceptions.HTTPClientError,  # read timeouts, resets, broken streams
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ChecksumError,  # corrupted in transit
    botocore.exceptions.FlexibleChecksumError,
)

AddressingStyle = Literal["auto", "virtual", "path"]
ChecksumPolicy = Literal["when_supported", "when_required"]


class S3Store(ObjectStore):
    """Objects under `prefix` in `bucket`. Credentials come from boto3's usual
    sources (environment, shared config, instance or container roles) unless a
    `session` is given.

    `max_attempts` counts the first attempt (like AWS_MAX_ATTEMPTS); botocore
    retries transient errors with exponential backoff and jitter. Objects
    larger than `multipart_threshold` are uploaded in `part_size` parts.
    `checksums="when_required"` turns off boto3's default CRC checksums on
    upload, for S3-compatible stores that reject them.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: AddressingStyle = "auto",
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 5,
        multipart_threshold: int = 64 * MiB,
        part_size: int = 16 * MiB,
        list_page_size: int = MAX_LIST_PAGE,
        max_pool_connections: int = 32,
        checksums: ChecksumPolicy = "when_supported",
        session: boto3.session.Session | None = None,
    ) -> None:
        super().__init__(prefix)
        if not bucket:
            raise ValueError("S3Store: bucket must not be empty")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3Store: part_size must be at least {MIN_PART_SIZE} bytes")
        if multipart_threshold < part_size:
            raise ValueError("S3Store: multipart_threshold must be at least part_size")
        if not 1 <= list_page_size <= MAX_LIST_PAGE:
            raise ValueError(f"S3Store: list_page_size must be in 1..{MAX_LIST_PAGE}")
        if max_attempts < 1:
            raise ValueError("S3Store: max_attempts must be at least 1")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.list_page_size = list_page_size
        session = session or boto3.session.Session()

        def make_client(attempts: int) -> Any:
            config = botocore.config.Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"total_max_attempts": attempts, "mode": "standard"},
                s3={"addressing_style": addressing_style},
                max_pool_connections=max_pool_connections,
                request_checksum_calculation=checksums,
                response_checksum_validation=checksums,
            )
            return session.client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )

        self._client = make_client(max_attempts)
        self._single_attempt_client = make_client(1)

    def describe(self) -> str:
        where = f" endpoint={self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def close(self) -> None:
        self._client.close()
        self._single_attempt_client.close()

    # -- error mapping ------------------------------------------------------

    def _translate(
        self, error: Exception, operation: str, full_key: str, *, missing_fails_condition: bool
    ) -> StoreError:
        where = f"S3 {operation} s3://{self.bucket}/{full_key}"
        if isinstance(error, botocore.exceptions.ClientError):
            info = error.response.get("Error", {})
            code = str(info.get("Code", ""))
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            message = f"{where}: HTTP {status} {code} {info.get('Message', '')}".rstrip()
            if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return PreconditionFailed(message)
            if code == "NoSuchBucket":
                return StoreError(message)
            if code == "NoSuchUpload":
                # A multipart upload vanished (aborted by a lifecycle rule?):
                # a retry of the whole PUT starts a new one.
                return StoreUnavailable(message)
            if code in _NOT_FOUND_CODES or status == 404:
                # If-Match on a missing key: S3 answers 404; the contract says
                # the condition failed.
                return PreconditionFailed(message) if missing_fails_condition else NotFound(message)
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                return StoreUnavailable(message)
            return StoreError(message)
        if isinstance(error, _TRANSIENT_BOTO_ERRORS):
            return StoreUnavailable(f"{where}: {error}")
        return StoreError(f"{where}: {error}")

    # -- reading ------------------------------------------------------------

    def get_with_info(
        self, key: str, start: int | None = None, end: int | None = None
    ) -> tuple[bytes, ObjectInfo]:
        first, last = validate_range(start, end)
        full_key = self.full_key(key)
        if last == first:
            # HTTP cannot ask for an empty range; the key must still exist.
            return b"", self.head(key)
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": full_key}
        if first > 0 or last is not None:
            params["Range"] = f"bytes={first}-{'' if last is None else last - 1}"
        try:
            response = self._client.get_object(**params)
            data = response["Body"].read()
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") == "InvalidRange":
                # The range starts at or past the end: the object exists and
                # the contract says return what exists there, nothing.
                return b"", self.head(key)
            raise self._translate(e, "GET", full_key, missing_fails_condition=False) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._translate(e, "GET", full_key, missing_fails_condition=False) from e
        size = _total_size(response.get("ContentRange"), response["ContentLength"])
        return data, ObjectInfo(key, size, response["ETag"], response.get("LastModified"))

    def head(self, key: str) -> ObjectInfo:
        full_key = self.full_key(key)
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=full_key)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise self._translate(e, "HEAD", full_key, missing_fails_condition=False) from e
        return ObjectInfo(
            key, response["ContentLength"], response["ETag"], response.get("LastModified")
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_list_prefix(prefix)  # here, not at the first next()
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        full_prefix = self.prefix + prefix
        params: dict[str, Any] = {
            "Bucket": self.bucket, "Prefix": full_prefix, "MaxKeys": self.list_page_size,
        }
        while True:
            try:
                page = self._client.list_objects_v2(**params)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
                raise self._translate(e, "LIST", full_prefix, missing_fails_condition=False) from e
            for item in page.get("Contents", ()):
                yield ObjectInfo(
                    item["Key"][len(self.prefix):], item["Size"], item["ETag"],
                    item.get("LastModified"),
                )
            if not page.get("IsTruncated"):
                return
            params["ContinuationToken"] = page["NextContinuationToken"]

    # -- writing --------------------------------------------------------------

    def put(
        self,
        key: str,
        data: Data,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        if if_match is not None and if_none_match:
            raise ValueError("put: if_match and if_none_match are mutually exclusive")
        data = as_bytes(data)
        full_key = self.full_key(key)
        size = len(data)
        if size > self.multipart_threshold and if_match is None:
            return self._put_multipart(full_key, data, if_none_match=if_none_match)
        if size > MAX_SINGLE_PUT:
            raise StoreError(f"S3 PUT {full_key}: {size} bytes with If-Match is over the "
                             f"single-PUT limit of {MAX_SINGLE_PUT}")
        conditional = if_match is not None or if_none_match
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": full_key, "Body": bytes(data)}
        if if_none_match:
            params["IfNoneMatch"] = "*"
        if if_match is not None:
            params["IfMatch"] = if_match
        client = self._single_attempt_client if conditional else self._client
        try:
            response = client.put_object(**params)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise self._translate(
                e, "PUT", full_key, missing_fails_condition=if_match is not None
            ) from e
        return response["ETag"]

    def _put_multipart(self, full_key: str, data: Data, *, if_none_match: bool) -> str:
        view = memoryview(data)
        # Grow parts if needed to stay within 10,000 of them.
        part_size = max(self.part_size, -(-len(view) // MAX_PARTS))
        try:
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full_key
            )["UploadId"]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise self._translate(e, "PUT (multipart start)", full_key,
                                  missing_fails_condition=False) from e
        completed = False
        try:
            parts = []
            for number, offset in enumerate(range(0, len(view), part_size), start=1):
                response = self._client.upload_part(
                    Bucket=self.bucket, Key=full_key, UploadId=upload_id, PartNumber=number,
                    Body=bytes(view[offset:offset + part_size]),
                )
                parts.append({"ETag": response["ETag"], "PartNumber": number})
            params: dict[str, Any] = {
                "Bucket": self.bucket, "Key": full_key, "UploadId": upload_id,
                "MultipartUpload": {"Parts": parts},
            }
            client = self._client
            if if_none_match:
                params["IfNoneMatch"] = "*"
                client = self._single_attempt_client
            response = client.complete_multipart_upload(**params)
            completed = True
            return response["ETag"]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise self._translate(e, "PUT (multipart)", full_key,
                                  missing_fails_condition=False) from e
        finally:
            if not completed:
                self._abort_quietly(full_key, upload_id)

    def _abort_quietly(self, full_key: str, upload_id: str) -> None:
        # Best effort: a bucket lifecycle rule for incomplete multipart
        # uploads is the backstop for aborts that fail.
        try:
            self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=full_key, UploadId=upload_id
            )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            pass

    def delete(self, key: str, *, if_unmodified_since: datetime | None = None) -> None:
        validate_since(if_unmodified_since)
        full_key = self.full_key(key)
        if if_unmodified_since is not None:
            try:
                modified = self.head(key).last_modified
            except NotFound:
                return
            if modified is None or modified > if_unmodified_since:
                raise PreconditionFailed(
                    f"S3 DELETE s3://{self.bucket}/{full_key}: modified at {modified}, after "
                    f"{if_unmodified_since.isoformat()}")
        try:
            self._client.delete_object(Bucket=self.bucket, Key=full_key)
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in _NOT_FOUND_CODES:
                return  # S3 answers 204 here; some compatibles answer 404
            raise self._translate(e, "DELETE", full_key, missing_fails_condition=False) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._translate(e, "DELETE", full_key, missing_fails_condition=False) from e

    # -- the start-up safety check ---------------------------------------

    def _probe_conditional_put(self, probe: str, missing: str) -> None:
        super()._probe_conditional_put(probe, missing)
        self._probe_multipart_if_none_match(probe)

    def _probe_multipart_if_none_match(self, existing: str) -> None:
        """Large If-None-Match PUTs rely on CompleteMultipartUpload honouring
        the condition too; check it with a one-part upload (the last part may
        be small, so this costs a few bytes)."""
        full_key = self.full_key(existing)
        try:
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full_key)["UploadId"]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise self._translate(e, "multipart probe", full_key,
                                  missing_fails_condition=False) from e
        try:
            part = self._client.upload_part(
                Bucket=self.bucket, Key=full_key, UploadId=upload_id, PartNumber=1,
                Body=b"probe-multipart")
            self._single_attempt_client.complete_multipart_upload(
                Bucket=self.bucket, Key=full_key, UploadId=upload_id, IfNoneMatch="*",
                MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            error = self._translate(e, "multipart probe", full_key,
                                    missing_fails_condition=False)
            if isinstance(error, PreconditionFailed):
                return  # refused, as it must be
            raise error from e
        finally:
            self._abort_quietly(full_key, upload_id)
        raise StoreUnsafe(
            f"object store S3Store {self.describe()} does not honour conditional PUT: "
            "CompleteMultipartUpload with If-None-Match: * overwrote an existing object. "
            "glidefs needs it for large conditional uploads; refusing to run on this store."
        )


def _total_size(content_range: str | None, content_length: int) -> int:
    # "bytes 0-99/1234" -> 1234; without a range the length is the size.
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total != "*":
            return int(total)
    return content_length
