"""Storage on a local path, S3, GCS or any fsspec filesystem: layout, whole-file writes, JSON, retries.

Local paths, `s3://` and `gs://` use pyarrow's native filesystems (S3 takes the standard AWS configuration:
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_REGION`, ...); other URLs (`memory://`, ...) go through fsspec. A
reader never sees half a file: a local file is written to a temporary name and renamed; an object store makes an
object visible only once its upload completes, so objects are written directly (no copy + delete). Errors that
may pass (throttling, timeouts, dropped connections) are retried with backoff and, if they persist, raised as
`StorageUnavailable`; a refused request (permissions, credentials) is `StorageAccessDenied`; neither is ever
called corruption. Nothing here knows about teachers or training.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import pyarrow.fs as pafs

from pipeline.store import delay

TMP_MARK = ".tmp-"
NATIVE = ("s3", "gs", "gcs")
RETRY_ATTEMPTS = 6
RETRY_BASE_SECONDS = 0.2
T = TypeVar("T")


class StorageError(RuntimeError):
    """A storage location that cannot be used (not writable, full, missing), phrased for the user."""


class StorageUnavailable(StorageError):
    """Storage that did not answer (unreachable, throttled, timing out) after retries: not a data problem."""


class StorageAccessDenied(StorageError):
    """Storage that refused a request (permissions; credentials denied, expired or invalid): not a data problem,
    and not one a retry fixes."""


# ------------------------------------------------------------------------------------------------- addresses
def normalize_url(url: str) -> str:
    """Local paths become absolute (workers may run elsewhere); URLs are kept, without a trailing slash."""
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url))
    return url.rstrip("/")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str | None:
    """The local path behind a plain path, a file:// URL or a delay:// root; None for remote stores."""
    if is_local(url):
        return url.removeprefix("file://")
    if url.startswith(delay.SCHEME):
        return delay.parse(url)[1]
    return None


def join(url: str, *parts: str) -> str:
    url = normalize_url(url)
    if "://" in url:
        proto, rest = url.split("://", 1)
        return f"{proto}://" + posixpath.join(rest, *parts)
    return os.path.join(url, *parts)


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


@lru_cache(maxsize=8)
def _native_fs(protocol: str, endpoint: str | None, region: str | None) -> pafs.FileSystem:
    if protocol == "s3":
        kwargs: dict[str, Any] = {
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
            "connect_timeout": 5,
            "request_timeout": 30,
        }
        if endpoint:
            scheme, _, host = endpoint.rpartition("://")
            kwargs["endpoint_override"] = host.rstrip("/")
            if scheme:
                kwargs["scheme"] = scheme
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)
    return pafs.GcsFileSystem()


@lru_cache(maxsize=8)
def _delayed_fs(seconds: float) -> pafs.FileSystem:
    return delay.filesystem(seconds)


@lru_cache(maxsize=8)
def _fsspec_fs(protocol: str) -> pafs.FileSystem:
    import fsspec

    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(protocol)))


def pyarrow_fs(url: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it): native for local paths, S3 and GCS; fsspec for other URLs."""
    url = normalize_url(url)
    protocol = _protocol(url)
    if protocol == "file":
        return pafs.LocalFileSystem(), url.removeprefix("file://")
    if protocol == "delay":
        seconds, path = delay.parse(url)
        return _delayed_fs(seconds), path
    path = url.split("://", 1)[1]
    if protocol in NATIVE:
        endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if protocol == "s3" else None
        region = _env("AWS_REGION", "AWS_DEFAULT_REGION") if protocol == "s3" else None
        return _native_fs("s3" if protocol == "s3" else "gs", endpoint, region), path
    return _fsspec_fs(protocol), path


# ------------------------------------------------------------------------------------------------- retries
_TRANSIENT = re.compile(
    r"SLOW_?DOWN|THROTTL|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|NETWORK_CONNECTION|REQUEST_TIMEOUT|"
    r"RequestTimeout|curlCode|Connection (reset|refused|aborted)|timed? ?out|Temporary failure|Broken pipe|"
    r"\b50[0234]\b|Too Many Requests|\b429\b|Unable to connect|Couldn't connect",
    re.IGNORECASE,
)


def is_transient(e: BaseException) -> bool:
    """Could this storage error pass if the call were repeated (throttling, timeouts, dropped connections)?"""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(e, OSError) and bool(_TRANSIENT.search(str(e)))


# What S3 (through pyarrow's AWS SDK), GCS and HTTP stores answer when the credentials may not make a request or
# are not valid any more: 403, 401, or 400 for an expired or malformed token.
_ACCESS = re.compile(
    r"ACCESS_DENIED|AccessDenied|Forbidden|HTTP status 40[013]\b|InvalidAccessKeyId|SignatureDoesNotMatch|"
    r"ExpiredToken|TokenRefreshRequired|InvalidToken|InvalidClientTokenId|RequestExpired|PERMISSION_DENIED|"
    r"Permission denied|UNAUTHENTICATED|Unauthorized",
    re.IGNORECASE,
)
_EXPIRED = re.compile(r"Expired|TokenRefresh|InvalidToken|HTTP status 40[01]\b|Unauthorized", re.IGNORECASE)


def is_access_denied(e: BaseException) -> bool:
    """Did the store refuse this request for its credentials or permissions (not for the data, not for load)?"""
    if isinstance(e, PermissionError):
        return True
    return isinstance(e, OSError) and not is_transient(e) and bool(_ACCESS.search(str(e)))


def credentials_in_use(url: str) -> str:
    """Who a store sees for `url`, without secrets: the local user, or the AWS key id's first characters / profile
    and endpoint, or the Google credentials file."""
    protocol = _protocol(url)
    if _local_path(url) is not None:
        import pwd

        uid = os.geteuid()
        with contextlib.suppress(KeyError):
            return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
        return f"uid {uid}"
    if protocol == "s3":
        key, profile = _env("AWS_ACCESS_KEY_ID"), _env("AWS_PROFILE")
        who = (
            f"access key id {key[:8]}{'…' if len(key) > 8 else ''} (AWS_ACCESS_KEY_ID)"
            if key
            else (
                f"AWS profile {profile!r}"
                if profile
                else "the AWS default credentials (~/.aws, instance role)"
            )
        )
        token = " with a session token (AWS_SESSION_TOKEN)" if _env("AWS_SESSION_TOKEN") else ""
        return f"{who}{token} at endpoint {_env('AWS_ENDPOINT_URL_S3', 'AWS_ENDPOINT_URL') or 'AWS S3'}"
    if protocol in ("gs", "gcs"):
        path = _env("GOOGLE_APPLICATION_CREDENTIALS")
        return f"Google credentials {path}" if path else "Google application default credentials"
    return f"the credentials of the {protocol}:// filesystem"


def access_denied(url: str, e: OSError) -> StorageAccessDenied:
    """The error for a refused request on `url`: what was refused, for whom, and the fix (never "delete")."""
    detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    if _local_path(url) is not None:
        fix = (
            "give that user read and write permission on the file and its folders (chmod / chown, or the "
            "volume's mount options)"
        )
    elif _EXPIRED.search(detail):
        fix = "the credentials have expired or are not valid: renew them (a new session token, `aws sso login`, ...)"
    else:
        fix = (
            "these credentials are not allowed to read or write it (or their session token expired): use "
            "credentials allowed s3:GetObject, s3:PutObject and s3:ListBucket under root (without ListBucket S3 "
            "answers 403, not 404, for an object that does not exist)"
        )
    return StorageAccessDenied(
        f"access to {url} was denied ({detail}) for {credentials_in_use(url)}. This is a permission or credential "
        f"problem, not damaged data: keep the files. Fix: {fix}; then re-run the same command (what was written "
        "and the last checkpoint are kept)"
    )


_ATTEMPTS: contextvars.ContextVar[int | None] = contextvars.ContextVar("camkd_storage_attempts", default=None)


@contextlib.contextmanager
def one_attempt():
    """Inside: no retries of our own (the SDK's still apply). For a look that only informs, like --dry-run: an
    unreachable store is reported in ~2 s instead of after the ~12 s of backoff a real run rightly waits."""
    token = _ATTEMPTS.set(1)
    try:
        yield
    finally:
        _ATTEMPTS.reset(token)


@dataclass(frozen=True)
class RetryPolicy:
    """How long transient storage errors are retried: at least `attempts` tries and, with `seconds`, for at least
    that long in all (an object store's throttling burst can outlast six quick tries), backing off from `base`
    seconds, doubling up to `max_delay`, with jitter."""

    attempts: int = RETRY_ATTEMPTS
    seconds: float = 0.0
    base: float = RETRY_BASE_SECONDS
    max_delay: float = 5.0


def retry_policy(seconds: float) -> RetryPolicy:
    """The policy of `storage.retry_seconds`: the usual quick tries, continued until `seconds` have passed."""
    return RetryPolicy(seconds=float(seconds))


def retrying(
    fn: Callable[[], T], url: str, attempts: int | None = None, policy: RetryPolicy | None = None
) -> T:
    """Call `fn`, retrying transient storage errors with exponential backoff and jitter; a persistent one
    becomes StorageUnavailable naming `url`. A refused request becomes StorageAccessDenied at once; other errors
    pass through at once. Inside `one_attempt()` there are no retries of our own, whatever the policy."""
    policy = policy or RetryPolicy(base=RETRY_BASE_SECONDS)
    single = _ATTEMPTS.get()
    attempts = single or attempts or policy.attempts
    budget = 0.0 if single else policy.seconds
    delay = policy.base
    started = time.time()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except OSError as e:
            if is_access_denied(e):
                raise access_denied(url, e) from e
            if not is_transient(e):
                raise
            elapsed = time.time() - started
            if attempt >= attempts and elapsed >= budget:
                raise StorageUnavailable(
                    f"storage did not answer for {url} after {attempt} attempts over {elapsed:.1f} s "
                    f"(last error: {str(e).splitlines()[0][:300]}). The endpoint is unreachable or throttling: "
                    "check the network, AWS_ENDPOINT_URL / credentials, and the store's request limits "
                    "(`storage.retry_seconds` sets how long a read keeps trying). This is not data corruption; "
                    "re-run the same command once the store answers"
                ) from e
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, policy.max_delay)


# ------------------------------------------------------------------------------------------------- files
def exists(url: str) -> bool:
    fs, path = pyarrow_fs(url)
    return retrying(lambda: fs.get_file_info(path).type != pafs.FileType.NotFound, url)


def makedirs(url: str) -> None:
    fs, path = pyarrow_fs(url)
    try:
        retrying(lambda: fs.create_dir(path, recursive=True), url)
    except StorageUnavailable:
        raise
    except OSError as e:
        raise StorageError(
            f"cannot create folder {url!r}: {e.strerror or e}; check the path and its permissions"
        ) from e


def _write_error(url: str, e: OSError) -> StorageError:
    if is_access_denied(e):
        return access_denied(url, e)
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
    reason = "the disk is full" if full else (e.strerror or str(e))
    return StorageError(f"could not write {url!r}: {reason}; free space or choose another `root`")


def write_bytes_atomic(url: str, data: bytes | memoryview) -> None:
    """Write a whole file so that a reader sees the old file or the new one, never half of it: locally a
    temporary name renamed over `url`; on an object store a direct write (the object appears when complete).
    `data` may be a memoryview (of an Arrow buffer: written as it is, without a copy)."""
    url = normalize_url(url)
    path = _local_path(url)
    if path is not None:  # a delayed root is a local folder too: written locally, reads are what it delays
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _write_error(url, e) from e
        return
    fs, path = pyarrow_fs(url)

    def put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    try:
        retrying(put, url)
    except StorageUnavailable:
        raise
    except OSError as e:
        raise _write_error(url, e) from e


def read_bytes(url: str) -> bytes:
    fs, path = pyarrow_fs(url)

    def get() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retrying(get, url)


def write_json(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_sizes(url: str) -> dict[str, int]:
    """{base name: size in bytes} of the files directly in a folder ({} if it does not exist); one listing."""
    fs, path = pyarrow_fs(url)

    def ls() -> dict[str, int]:
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except FileNotFoundError:
            return {}
        return {posixpath.basename(i.path.rstrip("/")): (i.size or 0) for i in infos}

    return retrying(ls, url)


def listdir(url: str) -> list[str]:
    """Base names in a folder ([] if it does not exist)."""
    return sorted(list_sizes(url))


def remove(url: str) -> None:
    fs, path = pyarrow_fs(url)

    def rm() -> None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type != pafs.FileType.NotFound:
            fs.delete_file(path)

    retrying(rm, url)


def check_writable(url: str) -> None:
    """Fail early, with a clear message, if `url` cannot take files (read-only, missing permissions, full)."""
    makedirs(url)
    probe = join(url, f".write-probe{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        write_bytes_atomic(probe, b"ok" * 1024)
        remove(probe)
    except StorageUnavailable:
        raise
    except StorageError as e:
        raise StorageError(
            f"storage {url!r} is not writable ({str(e).split(': ', 1)[-1]}); fix its permissions/space or set "
            "`root` elsewhere"
        ) from e


# ------------------------------------------------------------------------------------------------- layout
def dataset_dir(root: str, name: str, fingerprint: str) -> str:
    return join(root, "datasets", f"{name}-{fingerprint}")


def teacher_dir(root: str, dataset_fp: str, teacher_id: str) -> str:
    """Everything cached for one teacher on one dataset: its head and one folder per (view spec, format)."""
    return join(root, "cache", dataset_fp, teacher_id)


def teachers_dir(root: str, name: str) -> str:
    return join(root, "teachers", name)


def runs_dir(root: str, experiment: str) -> str:
    return join(root, "runs", experiment)


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"
