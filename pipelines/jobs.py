"""Running ``radjepa`` commands on a remote Ray cluster through the Ray Jobs API.

``radjepa submit`` ships the local checkout to the cluster (runtime_env ``working_dir``) and runs
``python -m pipelines.cli <command> ...`` there, so the code that runs is the code on the
user's disk, not whatever the cluster image happened to be built from. The functions here are
plain and typed so the CLI stays a thin shell and tests drive a real job server directly.

Secrets never travel with a job. Ray keeps a job's entrypoint and runtime env (env vars included)
in plain text in its record, which every user of the dashboard or the Jobs API can read
(``GET /api/jobs/``, ``ray job list``), and the head's ``runtime_env_agent.log`` repeats it. A
submission that would carry a credential (a variable named like one, the de-identification key,
a URL with a password) is refused before anything is uploaded; the cluster gets its secrets in
its own environment (Kubernetes Secrets in the pod env, an env file on VMs).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from pipelines.provenance import submitter_env
from radjepa.error_text import error_line

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from radjepa.config import Config

log = logging.getLogger(__name__)

ADDRESS_ENVS = ("RAY_JOB_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# Ray's JobSubmissionClient replaces the address it is given with these when they are set
# (RAY_API_SERVER_ADDRESS first): `--address http://prod:8265` with RAY_ADDRESS=dev:6379 in the
# shell went to dev. The client is built with them hidden (see connect).
RAY_ADDRESS_OVERRIDES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
RUNTIME_ENV_FILE = Path("cluster") / "runtime_env.yaml"
# Passed through when set locally: where the job should log its runs.
PASSTHROUGH_ENVS = ("MLFLOW_TRACKING_URI",)
DEID_SECRET_ENV = "RADJEPA_DEID_SECRET"
# Parts of a variable name (split at '_') that mark a credential: AWS_SECRET_ACCESS_KEY,
# MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN, HF_TOKEN, RADJEPA_API_KEYS, ...
# Whole parts only: TOKENIZERS_PARALLELISM or KEYRING_BACKEND are not secrets.
SECRET_NAME_PARTS = frozenset(
    {"SECRET", "SECRETS", "PASSWORD", "PASSWORDS", "PASSWD", "PASS", "PWD", "TOKEN", "TOKENS",
     "KEY", "KEYS", "APIKEY", "APIKEYS", "CREDENTIAL", "CREDENTIALS", "CREDS",
     "PASSPHRASE"}
)  # fmt: skip
# ...and words that end a part glued to another (PGPASSWORD, CLIENTSECRET, GHTOKEN)
_SECRET_SUFFIXES = ("PASSWORD", "PASSWD", "SECRET", "TOKEN", "APIKEY")
# a name that points at a secret rather than holding one (GOOGLE_APPLICATION_CREDENTIALS=/v/sa.json,
# AWS_WEB_IDENTITY_TOKEN_FILE, AWS_KMS_KEY_ID), or a switch (HF_HUB_DISABLE_IMPLICIT_TOKEN=1)
_REFERENCE_PARTS = frozenset({"FILE", "PATH", "DIR", "ID"})
# a file's absolute path, extension and all (/var/secrets/sa.json): a key or token in base64
# (AWS secret keys, tokens) may start with "/" and hold more of them, but never a "."
_PATH_VALUE = re.compile(r"/(?:[A-Za-z0-9_.-]+/)*[A-Za-z0-9_-]+\.[A-Za-z0-9]{1,8}")
_SWITCH_VALUES = frozenset({"", "0", "1", "true", "false", "yes", "no", "on", "off"})
# scheme://user:password@host: the password is in the value whatever the variable is called;
# the user info ends before the first / ? or # (an @ in a query string is not a password)
_URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@:\s]*:[^/?#@\s]+@")
# a key in a connection string: Azure Storage's (AZURE_STORAGE_CONNECTION_STRING, which MLflow's
# Azure artifact store reads), Service Bus's, an ODBC DSN's password
_CONNECTION_SECRET = re.compile(
    r"(?i)(?:^|[;\"'\s])(?:AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd)\s*="
)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"']+")
# the query parameters that sign a URL (Azure SAS, S3 and GCS presigned URLs): anyone holding
# the URL holds the access
_SIGNATURES = frozenset({"sig", "signature", "x-amz-signature", "x-goog-signature"})
WHERE_SECRETS_GO = (
    "put secrets in the cluster's own environment, which its jobs inherit (KubeRay: a "
    "Kubernetes Secret in the pod env of cluster/raycluster.yaml; VMs: the env file of "
    "cluster/autoscaler-vm.yaml; docs/CLUSTER.md, section 7)"
)
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
EXIT_STOPPED = 3
# `radjepa submit` / `jobs logs --follow` when the job server stopped answering: the job's own
# exit code is unknown (1 or 2 would read as the job's failure, and a script would submit again)
EXIT_SERVER_LOST = 4
# how long a followed job's server may not answer before the command gives up on it
SERVER_LOST_GRACE_S = 60.0
# how long `jobs stop` (Ray's job supervisor) waits after SIGTERM before SIGKILL. Ray's default,
# 3 s, is shorter than an interrupted pretrain or sweep needs to end its MLflow runs KILLED and
# let Tune save the sweep's state (a sweep took 3.4 s on 2 cores): killed first, the runs stayed
# RUNNING. The supervisor reads it from the job's env vars; a runtime env file or --env wins.
STOP_GRACE_ENV = "RAY_JOB_STOP_WAIT_TIME_S"
STOP_GRACE_S = 30

# gitignore-style patterns relative to the working dir. Ray's working_dir upload is capped
# (the job server takes 100 MiB per request) and the venv alone is several GB; outputs and
# caches never belong on the cluster either. Ray also honours .gitignore, but a checkout
# without one must still be safe.
# No trailing '/': Ray tests a directory's own path without one, so 'x/' would still walk x.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv",
    "venv",
    ".git",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "runs",
    "demo-output",
    "mlruns",
    "*.db",
    "*.parquet",
    "*.safetensors",
    "*.pt",
    "*.ckpt",
    "*.dcm",
    "*.zip",
    "*.tar",
    "*.tar.gz",
    "/build",
    "/dist",
    "data/*",
    # the folder, then everything in it: the folder alone leaves "*.dcm" excluding its DICOMs,
    # and without the folder its contents are never visited. Before the secrets below, which a
    # later pattern wins over: data/sample/.env stays behind
    "!data/sample",
    "!data/sample/**",
    # secrets kept as files beside the checkout (dotenv files; the API keys file and the VMs'
    # env file that docs/CLUSTER.md has you write): a job's working dir is unpacked readable by
    # everyone on every node that runs it, and no job needs them (the cluster has its own)
    ".env",
    ".env.*",
    "*.env",
    ".envrc",
    ".netrc",
    "*.pem",
    "*.key",
    "api-keys",
    "radjepa-api-keys",
    "radjepa-env",
    # ...and the logins a home folder holds, named as --working-dir: ssh keys, cloud, cluster,
    # registry and package-index credentials, tokens (~/.ray/auth_token, ~/.cache/huggingface),
    # app settings with tokens in them (~/.config/gh), shell histories (secrets typed inline)
    ".ssh",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.ppk",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.kdbx",
    ".gnupg",
    ".password-store",
    ".aws",
    ".azure",
    ".oci",
    ".gsutil",
    ".boto",
    ".s3cfg",
    ".mc",
    ".databrickscfg",
    ".terraform.d",
    "*.tfstate",
    "*.tfstate.backup",
    ".kube",
    "kubeconfig",
    "*.kubeconfig",
    ".docker",
    ".ray",
    ".config",
    ".cache",
    ".local",
    ".huggingface",
    ".ipython",
    ".jupyter",
    "*credentials*",
    "client_secret*.json",
    ".git-credentials",
    ".gitconfig",
    ".npmrc",
    ".pypirc",
    ".pgpass",
    ".my.cnf",
    ".vault-token",
    ".*history",
    ".histfile",
    ".lesshst",
    ".viminfo",
)


class JobsError(Exception):
    """A submission problem the user can fix (no address, unreachable server, bad file)."""


class JobServerLost(JobsError):
    """The job server stopped answering (a dropped ``kubectl port-forward``, a restarted
    head): what became of the job is not known here, and it may still be running."""


class JobServerRefused(JobsError):
    """What answered is no job server taking this command: Ray's token check, an
    authenticating proxy in front of it, a sign-in page. While a job is followed (a proxy's
    login expiring an hour into a pretrain) the job, still running, is not known to have
    failed: the command exits as for a lost server."""


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended; ``exit_code`` is what ``radjepa submit`` exits with."""

    job_id: str
    status: str
    message: str | None = None
    error_type: str | None = None
    driver_exit_code: int | None = None

    @property
    def exit_code(self) -> int:
        """0 on SUCCEEDED; the driver's own exit code on FAILED (2 = user error, as locally;
        128 + N for a driver signal N killed); 3 on STOPPED."""
        if self.status == "SUCCEEDED":
            return 0
        if self.status == "STOPPED":
            return EXIT_STOPPED
        code = self.driver_exit_code
        if code is not None and code < 0:  # Ray's -N for a driver a signal killed (the OOM
            return 128 - code  # killer's SIGKILL: -9), as a shell says it: 137
        return code or 1


@dataclass(frozen=True)
class JobSummary:
    """One row of ``radjepa jobs list`` (no runtime env: it may hold secrets)."""

    job_id: str
    status: str
    entrypoint: str
    start_time: int | None = None
    end_time: int | None = None
    message: str | None = None


@dataclass
class Submission:
    """What will be sent: the entrypoint and runtime env, plus printable names only."""

    entrypoint: str
    runtime_env: dict[str, Any]
    env_names: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """A log-safe one-paragraph description (env var names, never values)."""
        wd = self.runtime_env.get("working_dir", "-")
        names = ", ".join(sorted(self.env_names)) or "none"
        return f"entrypoint: {self.entrypoint}\nworking_dir: {wd}\nenv vars: {names}"


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The job server URL: the explicit one, else RAY_JOB_ADDRESS, else
    RAY_API_SERVER_ADDRESS, else RAY_ADDRESS.

    A bare ``host:port`` gets ``http://``; ``ray://`` (Ray Client) is refused because it is a
    different protocol on a different port.
    """
    env = os.environ if environ is None else environ
    value = address or next((env[k] for k in ADDRESS_ENVS if env.get(k)), None)
    if not value:
        raise JobsError(
            "no Ray job server address: pass --address http://HEAD:8265 or set RAY_JOB_ADDRESS"
        )
    if value.startswith("ray://"):
        raise JobsError(
            f"{value} is a Ray Client address; job submission needs the dashboard URL, "
            "e.g. http://HEAD:8265"
        )
    if "://" not in value:
        value = f"http://{value}"
    return value.rstrip("/")


def build_entrypoint(args: Sequence[str], python: str = "python") -> str:
    """The shell command run on the cluster: this package's CLI, quoted argument by argument.

    ``python -m pipelines.cli`` (not the ``radjepa`` script) so the uploaded working dir, which
    Ray puts first on the job's path, wins over any copy installed in the image.
    """
    name = command_name(args)
    if name is None:
        raise JobsError("nothing to run: give a radjepa command, e.g. `radjepa submit ingest ...`")
    if name in {"submit", "jobs"}:
        raise JobsError(f"`radjepa {name}` cannot itself be submitted as a job")
    if name == "quarantine" and len(_positionals(args, ("-c", "--config", "-s", "--set"))) > 2:
        # it prints the source path of each row it finds: patient-named folders, kept in the
        # job's log on the head, which every dashboard user can read
        raise JobsError(
            "`radjepa quarantine DST SRC...` prints the paths it finds and is not submitted as a "
            "job (its log is kept on the head, readable by every dashboard user): run it on a "
            "machine that reads the sources, or submit `radjepa quarantine DST` alone to list "
            "the rows"
        )
    return shlex.join([python, "-m", "pipelines.cli", *args])


# the options radjepa itself takes before a command (its root callback), each with a value
ROOT_OPTIONS = ("--log-level",)


def _positionals(args: Sequence[str], valued: tuple[str, ...]) -> list[str]:
    """The arguments of a command line that are no option nor an option's value (``valued``:
    the options that take one), the command's name first."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in valued or arg in ROOT_OPTIONS
        else:
            out.append(arg)
    return out


def command_name(args: Sequence[str]) -> str | None:
    """The radjepa command in a submitted command line, past the root options before it
    (``--log-level DEBUG serve ...``: the README's advice for a replica's traceback, refused
    as "unknown radjepa command '--log-level'"); None when there is none."""
    at = 0
    while at < len(args) and args[at].startswith("-"):
        option, has_value, _ = args[at].partition("=")
        if option not in ROOT_OPTIONS:
            raise JobsError(
                f"unknown radjepa option {option!r} before the command; radjepa itself takes "
                f"{', '.join(ROOT_OPTIONS)}"
            )
        at += 1 if has_value else 2
    return args[at] if at < len(args) else None


def load_runtime_env_file(path: Path) -> dict[str, Any]:
    """Read a runtime_env YAML (a mapping, e.g. env_vars/excludes/pip); errors name the file.

    A folder, an unreadable file or one that is not UTF-8 text (``--runtime-env`` given the
    wrong path) is one line too: each was a Python traceback and exit 1."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobsError(f"runtime env file not found: {path}") from None
    except UnicodeDecodeError:
        raise JobsError(f"runtime env file {path} is not UTF-8 text (a YAML file?)") from None
    except OSError as err:  # a folder, no permission
        raise JobsError(f"cannot read runtime env file {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise JobsError(f"runtime env file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JobsError(f"runtime env file {path} must hold a mapping, got {type(data).__name__}")
    env_vars = data.get("env_vars")
    if env_vars is not None and (
        not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values())
    ):
        raise JobsError(f"{path}: env_vars must map names to strings (quote numbers)")
    excludes = data.get("excludes")
    if excludes is not None and (
        not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes)
    ):
        # a string was split into its characters, and its "*" left nothing to upload: the job
        # ran the code installed in the image, in silence
        raise JobsError(
            f'{path}: excludes must be a list of patterns, e.g. excludes: ["*.npy"], got '
            f"{type(excludes).__name__}"
        )
    return {k: v for k, v in data.items() if v is not None or k not in ("env_vars", "excludes")}


def parse_env_assignments(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings from ``--env`` into a dict; a missing '=' is an error."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobsError(f"--env expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


# what a value glued to -c / -s looks like (see _option_values)
_GLUED = {
    "-c": re.compile(r"(?i).*(\.ya?ml|://.*)$"),
    "-s": re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)+="),
}


def _option_values(args: Sequence[str], names: tuple[str, ...]) -> list[str]:
    """The values given to any of ``names`` in a command line, in order, in every spelling the
    command's parser (click) takes: ``-c X``, ``--config X``, ``--config=X`` and the short
    option glued to its value, ``-cX`` (``-sKEY=V``). A spelling missed here let the checks
    before the upload read another config than the job would.

    A glued value counts only when it looks like one (a YAML file or a URI; ``section.key=``):
    which arguments are other options' values is the command's parser's to know, and
    ``--reason "-see INC-42"`` was read as an override ``ee INC-42``."""
    values, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":  # the rest are arguments, as click reads them
            break
        if arg in names:
            if i + 1 < len(args):
                values.append(args[i + 1])
            i += 2
            continue
        for name in names:
            if name.startswith("--"):
                if arg.startswith(name + "="):
                    values.append(arg[len(name) + 1 :])
            elif len(name) == 2 and arg.startswith(name) and _GLUED[name].match(arg[2:]):
                values.append(arg[2:])
        i += 1
    return values


def _config_location(args: Sequence[str], working_dir: Path) -> str | None:
    """The config the radjepa command ``args`` names (the last ``-c``), as the job will read
    it: a relative path is relative to the uploaded folder."""
    configs = _option_values(args, ("-c", "--config"))
    path: str | None = configs[-1] if configs else None
    if path is not None and "://" not in path and not Path(path).is_absolute():
        path = str(working_dir / path)
    return path


def _job_config(args: Sequence[str], working_dir: Path) -> Config:
    """The config the job will load: its file with its ``--set`` overrides (ConfigError)."""
    from radjepa.config import load_config

    return load_config(_config_location(args, working_dir), _option_values(args, ("-s", "--set")))


def secret_envs_of(args: Sequence[str], working_dir: Path) -> tuple[str, str]:
    """The variables that hold the keys of the radjepa command ``args``: ``ingest.secret_env``
    (pseudonyms) and ``serve.api_keys_env`` (the API's bearer keys) of the config it names,
    with its ``--set`` overrides.

    A config may name any variable (``ingest.secret_env: SITE_A``), so a name that does not look
    like a secret can still hold the key: :func:`secret_problem` refuses it too. The config is
    read here as the job will read it: a relative path is relative to the uploaded folder.
    """
    try:
        cfg = _job_config(args, working_dir)
    except (OSError, ValueError) as err:  # a ConfigError is a ValueError
        first = error_line(err)
        raise JobsError(
            "the job's config names the variable that holds the de-identification key "
            f"(ingest.secret_env), and it cannot be read here: {first}"
        ) from None
    return cfg.ingest.secret_env, cfg.serve.api_keys_env


def _named_like_secret(name: str, value: str) -> bool:
    """Whether a variable's name says it holds a credential (its value only tells apart a
    reference to one: a path, an id, a switch)."""
    parts = [p for p in name.upper().split("_") if p]
    if not (SECRET_NAME_PARTS & set(parts) or any(p.endswith(_SECRET_SUFFIXES) for p in parts)):
        return False
    if parts and parts[-1] in _REFERENCE_PARTS:
        return False
    text = value.strip()
    return not (text.lower() in _SWITCH_VALUES or _PATH_VALUE.fullmatch(text))


def secret_problem(
    args: Sequence[str],
    env_vars: Mapping[str, str],
    deid_envs: Iterable[str],
    other: Mapping[str, Any] | None = None,
) -> str | None:
    """Why this job's record would hold a credential, or None.

    Checks the env vars by name (:data:`SECRET_NAME_PARTS`, or one of ``deid_envs``: the
    variables the job's config reads its keys from) and every env value, command argument and
    ``other`` runtime-env field for a URL with a password. Names only in the answer: it is
    printed.
    """
    deid = set(deid_envs)
    names = sorted(n for n, v in env_vars.items() if n in deid or _named_like_secret(n, v))
    if names:
        return f"{', '.join(names)} would be stored with the job"
    urls = sorted(n for n, v in env_vars.items() if _holds_credential(v))
    if urls:
        return (
            f"{', '.join(urls)} holds a credential (in a URL or a connection string), which "
            "would be stored with the job"
        )
    if any(_holds_credential(a) for a in args):
        return (
            "the command holds a credential (in a URL or a connection string), which would "
            "be stored with the job"
        )
    if _holds_credential(json.dumps(other or {})):
        return (
            "the runtime env (pip, conda, py_modules ...) holds a credential (in a URL or a "
            "connection string), which would be stored with the job"
        )
    return None


def _holds_credential(text: str) -> bool:
    """A password in a URL (``s3://key:secret@bucket``), a credential in its query
    (``?secret_key=``, ``&token=``, a signed URL's ``sig=``), or a key in a connection string
    (Azure's ``AccountKey=``, ODBC's ``Pwd=``)."""
    if _URL_PASSWORD.search(text) or _CONNECTION_SECRET.search(text):
        return True
    for url in _URL.findall(text):
        for name, value in parse_qsl(urlsplit(url).query):
            # a query parameter named as a credential is (?keyword=chest is not, nor a switch
            # such as ?sort_keys=1); a signed URL's signature is one, whatever it is called
            if name.lower() in _SIGNATURES or _named_like_secret(name.replace("-", "_"), value):
                return True
    return False


def _refuse_invalid_config(args: Sequence[str], working_dir: Path) -> None:
    """A job whose config file is here and invalid failed on the cluster after the upload and
    the driver's start (minutes), with the error this gives in a second. A config named but
    not here may be a path on the cluster's nodes: the job reads it there. With no config
    named, the job reads the built-in defaults, which are here too: its ``--set`` overrides
    (a mistyped key, a value of the wrong type) are checked against them the same way."""
    from radjepa.config import ConfigError

    location = _config_location(args, working_dir)
    if location is not None and not Path(location).is_file():
        return
    try:
        _job_config(args, working_dir)
    except ConfigError as err:
        if str(err).startswith(("config file not found:", "cannot read config ")):
            return  # a file it extends may be on the cluster's nodes or buckets, not here
        what = f"config {location}" if location else "--set overrides of the default config"
        raise JobsError(f"not submitted: the job's {what}: {err}") from None


# the patient files a refusal counts before it stops looking (see upload_check.scan_upload)
_MOST_PATIENT_FILES = 20


# names every resolver gives this machine (glibc's /etc/hosts defaults included)
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def _names_this_machine(uri: str) -> bool:
    """Whether a server URI names the machine it is read on: a loopback host (``localhost``,
    127.0.0.0/8, ``::1``, also as ``::ffff:127.0.0.1`` or the short ``127.1``) or the
    unspecified address (``0.0.0.0``, which ``mlflow server --host 0.0.0.0`` prints). The same
    text names another machine to every node of the cluster."""
    import ipaddress
    import socket

    try:
        host = (urlsplit(uri).hostname or "").rstrip(".").lower()
    except ValueError:  # a malformed URI is the tracking client's to refuse
        return False
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:  # 127.1, 2130706433: forms the resolver reads as IPv4 addresses
            address = ipaddress.ip_address(socket.inet_aton(host))
        except OSError:
            return False
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return address.is_loopback or address.is_unspecified


def _patient_refusal(found: Sequence[object], where: str, remedy: str) -> JobsError:
    """The one refusal of an upload carrying patient images or archives, wherever they were
    found (``where``: the working dir, a py_modules entry). The walk stops at the most it
    counts, so the count says so."""
    most = _MOST_PATIENT_FILES
    counted = f"{most} or more" if len(found) >= most else str(len(found))
    return JobsError(
        f"not submitted: {counted} file(s) in {where} look like medical images or archives "
        f"(by name or content), e.g. {found[0]}: {remedy}"
    )


# why an upload with patient files is refused, said once for every place they were found
_UNPACKED = (
    "uploaded with the job and unpacked on every node that runs it, readable by everyone there"
)


def _refuse_patient_files(
    wd: Path, excludes: Sequence[str], wanted: Collection[Path] = ()
) -> frozenset[Path]:
    """Refuse an upload that would carry patient images or archives (``pipelines.upload_check``):
    the job's package is unpacked on every node that runs it, readable by everyone there. One
    path is named, on this console only: the user's own checkout. Returns which of ``wanted``
    (resolved paths) the upload carries, found in the same walk."""
    from pipelines.upload_check import (
        BUNDLED_DATA,
        SAMPLE_MANIFEST,
        bundled_files,
        scan_upload,
    )

    scan = scan_upload(
        wd, excludes, wanted=wanted, exempt=bundled_files(wd), most=_MOST_PATIENT_FILES
    )
    found = scan.patient
    if found:
        sample = ""
        if any(p.is_relative_to(BUNDLED_DATA) for p in found):
            # an export dropped beside the sample, or a sample file changed
            sample = (
                f"Of {BUNDLED_DATA}, only the files {BUNDLED_DATA}/{SAMPLE_MANIFEST} lists, "
                "as it lists them, pass. "
            )
        raise _patient_refusal(
            found,
            str(wd),
            f"the working dir is {_UNPACKED}. {sample}Move them out of the checkout "
            "(data belongs in the bucket; a virtualenv other than .venv or venv belongs outside "
            "it too), or list them in .gitignore, a .rayignore, or excludes: in "
            f"{RUNTIME_ENV_FILE}",
        )
    return scan.carried


def _refuse_patient_py_modules(py_modules: object, excludes: Sequence[str]) -> None:
    """The runtime env's local ``py_modules`` travel with the job too, unpacked on its nodes
    like the working dir: a folder zipped with the same excludes (and its own ``.gitignore``
    and ``.rayignore``), a ``.py`` file, a wheel as it is. Each is refused as the working dir
    is. Relative paths are the submitting shell's, as Ray reads them; a URI is not uploaded
    from here, and an entry Ray cannot use is left to its own error."""
    from pipelines.upload_check import looks_like_patient_data, patient_members, scan_upload

    if not isinstance(py_modules, list):
        return
    for entry in py_modules:
        if not isinstance(entry, str) or "://" in entry:
            continue
        path = Path(entry)
        remedy = "list them in a .gitignore or .rayignore in it, or in the runtime env's excludes:"
        if path.is_dir():
            found = [str(p) for p in scan_upload(path, excludes, most=_MOST_PATIENT_FILES).patient]
        elif path.suffix == ".whl" and path.is_file():
            found = patient_members(path, _MOST_PATIENT_FILES)
            remedy = "build the wheel without them"
        elif path.suffix == ".py" and path.is_file():
            found = [path.name] if looks_like_patient_data(path) else []
        else:
            continue
        if found:
            raise _patient_refusal(
                found,
                f"the runtime env's py_modules entry {entry}",
                f"the entry is {_UNPACKED}. Move them out of it (data belongs in the bucket) "
                f"or {remedy}",
            )


@dataclass(frozen=True)
class _LocalConfig:
    """A config file of the job that is here: as the command (or the file extending it) names
    it, where it is (resolved), whether it is named by an absolute path, and the folder a
    relative name would be read from (the working dir; the extending file's folder)."""

    named: str
    path: Path
    absolute: bool
    base: Path


def _local_configs(args: Sequence[str], working_dir: Path) -> list[_LocalConfig]:
    """The job's config and the files it extends (``extends:``, resolved as
    :func:`radjepa.config.load_config` resolves it), as long as they are files here: a URI, or
    a path not here (the cluster's nodes may have it), ends the chain."""
    import yaml

    from radjepa.config import _parent_location

    location = _config_location(args, working_dir)
    named = (_option_values(args, ("-c", "--config")) or [""])[-1]
    base = working_dir
    found: list[_LocalConfig] = []
    while location is not None and "://" not in location and Path(location).is_file():
        path = Path(location).resolve()
        if any(c.path == path for c in found):  # a loop: load_config says so
            break
        found.append(_LocalConfig(named, path, Path(named).is_absolute(), base))
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            break  # the config check has said what is wrong with it
        parent = data.get("extends") if isinstance(data, dict) else None
        if not isinstance(parent, str):
            break
        location, base = _parent_location(location, parent), Path(location).parent
        named = f"{parent} (extends: in {named})"
    return found


def _refuse_configs_not_uploaded(
    configs: Sequence[_LocalConfig], carried: Collection[Path], working_dir: Path
) -> None:
    """A config file that is here but that the job cannot read on the cluster (left out of the
    upload: under runs/, .gitignore'd, outside the working dir; or named by an absolute path,
    which the job reads on its node) passed the config check here, then failed on the cluster,
    after the upload and the driver's start, with "config file not found"."""
    for config in configs:
        if config.path in carried and config.absolute:
            relative = os.path.relpath(config.path, config.base)
            raise JobsError(
                f"not submitted: the job's config {config.named} is an absolute path, which the "
                "job reads on the cluster's node, not in its upload (unpacked elsewhere there): "
                f"give it as {relative}"
            )
        if config.path in carried:
            continue
        if config.absolute:
            where = (
                "an absolute path to a file here, which the job would read on the cluster's "
                "node (for a file the nodes mount at that path, give file://PATH)"
            )
        elif config.path.is_relative_to(working_dir):
            where = (
                "left out of the upload (runs/ is never uploaded; .gitignore, a .rayignore or "
                "excludes: leave out others)"
            )
        else:
            where = f"outside the working dir {working_dir}, which is all the upload carries"
        raise JobsError(
            f"not submitted: the job's config {config.named} is {where}: the job would fail on "
            "the cluster with 'config file not found'. Put it in the bucket and give its URI, "
            "or copy it into the working dir (outside runs/) and give its path relative to it"
        )


def build_submission(
    args: Sequence[str],
    *,
    working_dir: Path | None = None,
    runtime_env_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    pass_env: Sequence[str] = (),
    pass_deid_secret: bool = False,
    environ: Mapping[str, str] | None = None,
) -> Submission:
    """Assemble entrypoint + runtime env.

    Precedence for env vars (later wins): the submitter's commit and the stop grace
    (:data:`STOP_GRACE_ENV`), the runtime env file, passthrough of local
    MLFLOW_TRACKING_URI, ``pass_env`` names, explicit ``env``. The file's other keys (pip,
    excludes, ...) are kept; excludes are added to the defaults and ``working_dir`` is always
    the local folder being uploaded. A submission that would carry a secret, from any of those
    or ``pass_deid_secret``, is refused (:func:`secret_problem`): the job record is public to
    every dashboard user.

    ``working_dir`` None is the current folder, which must be a radjepa checkout: run from a
    home folder with radjepa installed, its keys and logins were uploaded, unpacked readable by
    everyone on the nodes, for a job that runs the image's code anyway. A folder the user names
    is theirs to choose (a warning when it is no checkout).
    """
    local = os.environ if environ is None else environ
    wd = (Path() if working_dir is None else working_dir).resolve()
    if not wd.is_dir():
        raise JobsError(f"working dir {wd} is not a directory")
    if not (wd / "pipelines" / "cli.py").is_file():
        if working_dir is None:
            raise JobsError(
                f"not submitted: {wd} is not a radjepa checkout, and all of it would be "
                "uploaded with the job, unpacked readable by everyone on every node that runs "
                "it; the job runs the code installed in the cluster image anyway. Run `radjepa "
                "submit` from your radjepa checkout, or name a folder that holds only what the "
                "job reads with --working-dir"
            )
        log.warning(
            "%s is not a radjepa checkout: the job will run the copy installed in the cluster "
            "image, not your local code",
            wd,
        )
    if runtime_env_file is None and (wd / RUNTIME_ENV_FILE).is_file():
        runtime_env_file = wd / RUNTIME_ENV_FILE
    base = load_runtime_env_file(runtime_env_file) if runtime_env_file else {}

    # the upload leaves .git behind: the run records the commit the submitter read here
    env_vars: dict[str, str] = (
        submitter_env(wd) | {STOP_GRACE_ENV: str(STOP_GRACE_S)} | dict(base.get("env_vars") or {})
    )
    for name in PASSTHROUGH_ENVS:
        value = None if name in (env or {}) else local.get(name)  # --env sets it after
        if value and _names_this_machine(value):
            # a port-forward to the tracking server, set for `radjepa models` here: on the
            # cluster it names the driver's own loopback, and every run failed to log
            log.warning(
                "%s in this shell names this machine: not passed to the job, which uses the "
                "cluster's own setting (--pass-env %s to pass a server the cluster reaches; "
                "--env %s=... for a Ray instance on this machine)",
                name,
                name,
                name,
            )
        elif value:
            log.info("%s from this shell is passed to the job (it overrides the cluster's)", name)
            env_vars[name] = value
    for name in pass_env:
        if name not in local:
            raise JobsError(f"--pass-env {name}: not set in this shell")
        if name in PASSTHROUGH_ENVS and _names_this_machine(local[name]):
            raise JobsError(
                f"--pass-env {name}: it names this machine, which on the cluster is the job's "
                "own node: give the tracking server's address the cluster reaches (for a Ray "
                f"instance on this machine: --env {name}=...)"
            )
        env_vars[name] = local[name]
    if pass_deid_secret:
        raise JobsError(
            "--pass-deid-secret is refused: the key (ingest.secret_env, RADJEPA_DEID_SECRET by "
            "default) would be stored in plain text in the job's record, which everyone with "
            f"the Ray dashboard or Jobs API can read; {WHERE_SECRETS_GO}"
        )
    env_vars.update(env or {})
    deid_envs = {DEID_SECRET_ENV, "RADJEPA_API_KEYS"}
    # the variable the job's config names, when its config is a local file (a bucket's is not
    # fetched here); a config that cannot be read leaves the name rule alone
    if not any("://" in c for c in _option_values(args, ("-c", "--config"))):
        _refuse_invalid_config(args, wd)
        with contextlib.suppress(JobsError):
            deid_envs.update(secret_envs_of(args, wd))
    problem = secret_problem(
        args, env_vars, deid_envs, {k: v for k, v in base.items() if k != "env_vars"}
    )
    if problem:
        raise JobsError(
            f"not submitted: {problem}, in plain text that everyone with the Ray dashboard or "
            f"Jobs API can read (and in the head's logs); {WHERE_SECRETS_GO}"
        )

    runtime_env: dict[str, Any] = {k: v for k, v in base.items() if k not in {"env_vars"}}
    runtime_env["working_dir"] = str(wd)
    runtime_env["excludes"] = list(DEFAULT_EXCLUDES) + list(base.get("excludes") or [])
    configs = _local_configs(args, wd)
    carried = _refuse_patient_files(wd, runtime_env["excludes"], [c.path for c in configs])
    _refuse_patient_py_modules(base.get("py_modules"), runtime_env["excludes"])
    _refuse_configs_not_uploaded(configs, carried, wd)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return Submission(build_entrypoint(args), runtime_env, list(env_vars))


# How long a job-server request may take to connect, then to answer: Ray's client sets no
# timeout, so a server that took the connection and never answered (a hung head behind a
# port-forward, a proxy holding the request) hung `submit`, `jobs list/logs/stop` for good.
# Ray's own server-side waits (GCS, the head's agent) end within 30 s. The log stream of
# `--follow` is a websocket of its own (aiohttp), not bounded by these.
JOB_SERVER_CONNECT_TIMEOUT_S = 10.0
JOB_SERVER_READ_TIMEOUT_S = 60.0
# JSON object of HTTP headers sent with every request, as `ray job submit` reads it: the
# credentials of an authenticating proxy in front of the dashboard
HEADERS_ENV = "RAY_JOB_HEADERS"
# requests reads it; passed to Ray's client too so the log stream (aiohttp) trusts the same CA
CA_BUNDLE_ENV = "REQUESTS_CA_BUNDLE"


def connect(address: str | None) -> JobSubmissionClient:
    """A client for the job server; an unreachable server, a proxy's refusal or an answer that
    is not Ray's becomes one readable JobsError."""
    import requests

    url = resolve_address(address)
    headers = _request_headers(os.environ)
    ca_bundle = os.environ.get(CA_BUNDLE_ENV) if url.startswith("https://") else None
    try:
        with _without_env(RAY_ADDRESS_OVERRIDES):  # the address chosen here, not Ray's env's
            return _client_class()(url, headers=headers, verify=ca_bundle or True)
    except requests.HTTPError as err:  # Ray's version check raises the status of /api/version
        gateway = _gateway_error(err)
        if gateway:
            raise JobsError(
                f"{gateway.replace('the job server', f'the job server at {url}', 1)}: a head "
                "restarting behind it answers again within minutes"
            ) from None
        code = err.response.status_code if err.response is not None else "?"
        raise JobsError(
            f"not a Ray job server at {url}: /api/version answered HTTP {code} (the job server "
            "is the dashboard's port, 8265 by default)"
        ) from None
    except (requests.JSONDecodeError, KeyError):
        raise JobsError(
            f"not a Ray job server at {url}: /api/version did not answer Ray's version (JSON); "
            "the job server is the dashboard's port, 8265 by default"
        ) from None
    except FileNotFoundError as err:  # Ray checks the CA bundle it is given
        raise JobsError(f"{CA_BUNDLE_ENV}: {err}") from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise JobsError(
            f"cannot reach the Ray job server at {url}: {err}{_tls_hint(err)} (the job server "
            "is the dashboard's port, 8265 by default; HOST:6379 or `auto` are not job servers)"
        ) from None


def _request_headers(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The headers :data:`HEADERS_ENV` holds (a JSON object of strings), or None. Its value is
    never printed: it holds credentials."""
    text = environ.get(HEADERS_ENV, "").strip()
    if not text:
        return None
    try:
        headers = json.loads(text)
    except ValueError:
        headers = None
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise JobsError(
            f"{HEADERS_ENV} must be a JSON object of header names and string values, e.g. "
            '\'{"Authorization": "Basic <base64 of user:password>"}\''
        )
    return headers


def _client_class() -> type[JobSubmissionClient]:
    """Ray's client with a timeout on each request, and a proxy's refusal or sign-in page named
    as such (Ray takes any 401/403 for its own token check, and fails on HTML with a JSON
    parser's message)."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    class Client(JobSubmissionClient):
        # Ray 2.60's private request method, which every request of the client goes through
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> requests.Response:
            kwargs.setdefault("timeout", (JOB_SERVER_CONNECT_TIMEOUT_S, JOB_SERVER_READ_TIMEOUT_S))
            if isinstance(kwargs.get("data"), bytes):
                # the package upload: sent as one sendall, under the connect timeout, which then
                # bounded the whole upload (10 s: a 6 MB checkout needed 5 Mbit/s); a stream is
                # sent in chunks, each with its own 10 s
                kwargs["data"] = io.BytesIO(kwargs["data"])
            answers: list[requests.Response] = []
            kwargs.setdefault("hooks", {"response": lambda r, *_, **__: answers.append(r)})
            try:
                response = super()._do_request(method, endpoint, **kwargs)
            except AuthenticationError:
                raise JobServerRefused(
                    _auth_refusal(self.get_address(), answers[-1] if answers else None)
                ) from None
            except requests.Timeout as err:
                raise JobServerLost(_timed_out(self.get_address(), method, endpoint, err)) from None
            html = _html_answer(self.get_address(), response)
            if html:
                raise JobServerRefused(html)
            return response

    return Client


def _timed_out(url: str, method: str, endpoint: str, err: Exception) -> str:
    """One line for a request that got no connection or no answer in time."""
    import requests

    if isinstance(err, requests.ConnectTimeout):
        what = f"no connection within {JOB_SERVER_CONNECT_TIMEOUT_S:.0f} s"
    else:
        what = f"connected, no answer within {JOB_SERVER_READ_TIMEOUT_S:.0f} s"
    return f"the job server stopped answering ({url}: {what}){_maybe_started(method, endpoint)}"


def _maybe_started(method: str, endpoint: str) -> str:
    """For the submission request itself: that the job may have started all the same."""
    if method == "POST" and endpoint == "/api/jobs/":
        return "; the job may have been submitted all the same: radjepa jobs list"
    return ""


def _auth_refusal(url: str, response: Any) -> str:
    """What a 401/403 means: Ray's own token check (its plain-text reply names the
    authentication token, with no challenge), or an authenticating proxy in front of it (an
    ingress with Basic auth or single sign-on), whose credentials go in :data:`HEADERS_ENV`."""
    status = getattr(response, "status_code", "401/403")
    challenge = response.headers.get("WWW-Authenticate", "") if response is not None else ""
    body = response.text if response is not None else ""
    if not challenge and "authentication token" in body:
        if status == 403:
            return (
                f"the job server at {url} refused the token it was sent (RAY_AUTH_TOKEN, "
                f"~/.ray/auth_token or an Authorization header in {HEADERS_ENV}): on the head, "
                "`ray get-auth-token` prints the right one"
            )
        # Ray 2.60 heads enable token auth when a token exists; the SDK sends it only in
        # token mode
        return (
            f"the job server at {url} requires a token: set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN (or put it in ~/.ray/auth_token); on the head, "
            "`ray get-auth-token` prints it"
        )
    said = f"{status}, WWW-Authenticate: {challenge[:80]}" if challenge else f"{status}"
    return (
        f"an authenticating proxy in front of the job server at {url} answered ({said}): put "
        f"its credentials in {HEADERS_ENV}, a JSON object of headers, e.g. "
        '\'{"Authorization": "Basic ..."}\' (docs/CLUSTER.md, section 7)'
    )


def _html_answer(url: str, response: Any) -> str | None:
    """Why a successful answer that is a web page (a proxy's sign-in page, after its
    redirects) is no job server's; None for any other answer. Ray's job API never answers
    HTML."""
    ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not response.ok or ctype not in {"text/html", "application/xhtml+xml"}:
        return None
    final = urlsplit(response.url or "")
    page = f"{final.scheme}://{final.netloc}{final.path}"  # no query: it may hold a state token
    where = "" if page.startswith(url) else f" from {page}"
    return (
        f"not a Ray job server at {url}: it answered HTML{where} (a proxy's sign-in page? "
        f"put its credentials in {HEADERS_ENV}: docs/CLUSTER.md, section 7)"
    )


def _tls_hint(err: BaseException) -> str:
    """Why Ray's "Failed to connect" was a TLS failure (Ray drops the reason), and the fix."""
    import requests

    if not isinstance(err.__context__, requests.exceptions.SSLError):
        return ""
    return (
        f" (TLS failed: for a server on plain HTTP use http://; for a private CA set "
        f"{CA_BUNDLE_ENV}=/path/to/ca.pem)"
    )


@contextlib.contextmanager
def _without_env(names: Iterable[str]) -> Iterator[None]:
    """Hide ``names`` from os.environ for the block, then put back what was there."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def submit(
    client: JobSubmissionClient,
    submission: Submission,
    *,
    job_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
) -> str:
    """Submit and return the submission id (the working dir is zipped and uploaded here)."""
    log.debug("submitting %s", submission.entrypoint)
    try:
        return client.submit_job(
            entrypoint=submission.entrypoint,
            runtime_env=submission.runtime_env,
            submission_id=job_id,
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
            metadata={"tool": "radjepa"},
        )
    except OSError as err:  # requests' errors: the upload or the submission cut short
        if _uploading(err):
            what = ", while the working dir was uploaded; the job was not submitted"
        else:
            what = _maybe_started("POST", "/api/jobs/")
        raise JobServerLost(f"{_lost(err)}{what}") from None
    except (RuntimeError, ValueError) as err:
        raise JobsError(f"submission failed: {submission_problem(err, submission)}") from None


def _uploading(err: OSError) -> bool:
    """Whether requests' error was the package upload's (a PUT), not the submission's."""
    request = getattr(err, "request", None)
    return getattr(request, "method", None) == "PUT"


def submission_problem(err: BaseException, submission: Submission) -> str:
    """What the job server's refusal of a submission means, in one line.

    A working dir whose zip is over the job server's request limit (Ray 2.60's dashboard takes
    100 MiB, well under the 512 MiB package limit Ray's own message names; a proxy in front of
    it may take less) came back as "status code 413: Maximum request body size 104857600
    exceeded", which names neither the upload nor what to leave out of it.
    """
    text = server_message(err)
    match = re.search(r"status code 413\b(?:: Maximum request body size (\d+))?", text)
    if match is None:
        return text
    limit = f" ({int(match.group(1)) / 1024**2:.0f} MiB)" if match.group(1) else ""
    wd = submission.runtime_env.get("working_dir", "the working dir")
    return (
        f"the zipped working dir {wd} is larger than the job server accepts{limit}: keep data, "
        "weights and outputs out of it (.gitignore, a .rayignore, or `excludes:` in "
        "cluster/runtime_env.yaml; Ray's warnings above name very large files), or give a "
        "smaller --working-dir"
    )


def server_message(err: BaseException) -> str:
    """The job server's error without the server-side traceback it embeds in 500 replies
    (e.g. a reused --job-id): the last line names the problem."""
    text = str(err)
    head, sep, tail = text.partition("Traceback (most recent call last):")
    if not sep:
        return text
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return f"{head.strip()} {lines[-1]}".strip() if lines else head.strip()


def outcome(client: JobSubmissionClient, job_id: str) -> JobOutcome:
    """The job's current status and, when it failed, Ray's message and the driver exit code."""
    info = _info(client, job_id)
    return JobOutcome(
        job_id=job_id,
        status=str(info.status.value if hasattr(info.status, "value") else info.status),
        message=info.message,
        error_type=info.error_type,
        driver_exit_code=getattr(info, "driver_exit_code", None),
    )


def wait(
    client: JobSubmissionClient,
    job_id: str,
    *,
    poll_s: float = 0.5,
    timeout_s: float | None = None,
    lost_grace_s: float | None = None,
) -> JobOutcome:
    """Poll until the job is terminal (after the log stream ends, Ray may lag a moment).

    A job server that stops answering is asked again for ``lost_grace_s`` (default
    ``SERVER_LOST_GRACE_S``: a port-forward that is restarted, a head coming back), then
    :class:`JobServerLost`."""
    grace = SERVER_LOST_GRACE_S if lost_grace_s is None else lost_grace_s
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    lost_since: float | None = None
    while True:
        try:
            res = outcome(client, job_id)
        except JobServerLost as err:
            now = time.monotonic()
            lost_since = now if lost_since is None else lost_since
            if now - lost_since >= grace:
                raise JobServerLost(
                    f"{err}, for {now - lost_since:.0f} s: job {job_id} may still be running; "
                    f"once the server answers: radjepa jobs logs {job_id} --follow"
                ) from None
            time.sleep(min(5.0, max(poll_s, 1.0)))
            continue
        lost_since = None
        if res.status in TERMINAL:
            return res
        if deadline is not None and time.monotonic() > deadline:
            raise JobsError(f"job {job_id} still {res.status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def follow(client: JobSubmissionClient, job_id: str, on_chunk: Callable[[str], None]) -> JobOutcome:
    """Stream the job's logs to ``on_chunk`` as they are produced, then return its outcome.

    The tail websocket closes when the job ends; if it drops early (proxy timeouts are common
    behind port-forwards) we fall back to polling instead of reporting a false failure.
    """

    import aiohttp

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            on_chunk(chunk)

    _info(client, job_id)  # a clear "no such job" rather than the websocket's 404
    try:
        asyncio.run(_tail())
    except (RuntimeError, OSError, aiohttp.ClientError) as err:
        log.warning(
            "log stream for %s ended early (%s); waiting for the job to finish", job_id, err
        )
    return wait(client, job_id)


def logs(client: JobSubmissionClient, job_id: str) -> str:
    """All logs the job produced so far."""
    _info(client, job_id)  # a clear "no such job" before asking for logs
    return _server_call(client.get_job_logs, job_id)


def stop(client: JobSubmissionClient, job_id: str) -> bool:
    """Ask the cluster to stop a job; False when it had already finished."""
    _info(client, job_id)
    return bool(_server_call(client.stop_job, job_id))


def _server_call(call: Callable[..., Any], *args: Any, about: str = "") -> Any:
    """A job-server request whose connection failure (or a proxy's 502-504) is
    :class:`JobServerLost`, and whose refusal is :class:`JobsError` led by ``about``, not a
    traceback."""
    try:
        return call(*args)
    except OSError as err:  # requests' errors are OSErrors: the server, not the job, is gone
        raise JobServerLost(_lost(err)) from None
    except RuntimeError as err:
        gateway = _gateway_error(err)
        if gateway:
            raise JobServerLost(gateway) from None
        raise JobsError(f"{about}{server_message(err)}") from None


def list_jobs(client: JobSubmissionClient) -> list[JobSummary]:
    """Submitted jobs, newest first."""
    rows = [
        JobSummary(
            job_id=j.submission_id or j.job_id or "?",
            status=str(j.status.value if hasattr(j.status, "value") else j.status),
            entrypoint=j.entrypoint,
            start_time=j.start_time,
            end_time=j.end_time,
            message=j.message,
        )
        for j in _server_call(client.list_jobs)
        if j.submission_id  # drivers started by hand (ray.init) are not ours to manage
    ]
    return sorted(rows, key=lambda r: r.start_time or 0, reverse=True)


def _info(client: JobSubmissionClient, job_id: str) -> Any:
    return _server_call(client.get_job_info, job_id, about=f"job {job_id}: ")


def _gateway_error(err: Exception) -> str | None:
    """A proxy's answer for a server behind it that is down (an ingress in front of a
    restarting head: 502, 503, 504), as Ray's client raises it (a RuntimeError; requests'
    HTTPError from its version check), in one line; None for the job server's own errors
    (no such job)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    found = re.match(r"Request failed with status code (50[234])\b", str(err))
    code = found.group(1) if found else str(status) if status in (502, 503, 504) else None
    if code is None:
        return None
    return f"the job server stopped answering (its proxy said {code})"


def _lost(err: OSError) -> str:
    """One line for a job server that stopped answering: requests' message nests the reason
    in a pool's repr (``HTTPConnectionPool(...): Max retries exceeded ... [Errno 111] ...``)."""
    text = str(err)
    errno = re.search(r"\[Errno -?\d+\] [^'\")]*", text)
    why = errno.group(0) if errno else (text.splitlines() or [type(err).__name__])[0][:200]
    return f"the job server stopped answering ({why})"
