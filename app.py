"""Athanor: a Stable Diffusion web UI with A1111's prompt language, API and metadata.

    python app.py [--port 7860] [--listen --auth user:pass] [--api] [--ckpt FILE] ...

Starts one server: the Gradio page at /, and with --api the A1111-compatible /sdapi/v1 routes.
"""
from __future__ import annotations

import os

# Nothing may reach the network: set before diffusers, transformers or gradio are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DIFFUSERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["DO_NOT_TRACK"] = "1"

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent
log = logging.getLogger("athanor")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="app.py",
        description="Athanor: Stable Diffusion in the browser, with AUTOMATIC1111's prompt syntax, API and metadata.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    net = p.add_argument_group("serving")
    net.add_argument("--port", type=int, default=7860, help="port to serve the UI and API on")
    net.add_argument("--listen", action="store_true",
                     help="bind 0.0.0.0 so other machines can connect (requires --auth or --auth-file)")
    net.add_argument("--auth", default=None, help="logins as user:pass[,user2:pass2]; required with --listen")
    net.add_argument("--auth-file", default=None, help="file with user:pass logins, one per line or comma-separated")
    net.add_argument("--insecure-no-auth", action="store_true",
                     help="allow --listen without logins (only on a network you fully trust)")
    net.add_argument("--api", action="store_true", help="serve the A1111-compatible API under /sdapi/v1")
    net.add_argument("--nowebui", action="store_true", help="serve only the API, no browser page (implies --api)")
    net.add_argument("--admin-users", default=None,
                     help="comma-separated login names (from --auth) that may see and cancel every user's jobs and "
                          "change settings; once one is named, only admins may change settings")
    net.add_argument("--tls-keyfile", default=None, help="TLS private key file: serve HTTPS (with --tls-certfile)")
    net.add_argument("--tls-certfile", default=None, help="TLS certificate file: serve HTTPS (with --tls-keyfile)")
    net.add_argument("--cors-allow-origins", default=None,
                     help="comma-separated origins (https://host:port) other web pages may call the API from; "
                          "default none")
    net.add_argument("--cors-allow-origins-regex", default=None, help="regular expression of such origins")
    net.add_argument("--allowed-hosts", default=None,
                     help="comma-separated host names (or addresses) this server may be reached under, besides "
                          "localhost/127.0.0.1 and, with --listen, this machine's own names and addresses; "
                          "'.example.com' allows its sub-domains; requests for any other Host get 403 "
                          "(protection against DNS rebinding)")
    net.add_argument("--forwarded-allow-ips", default=None,
                     help="comma-separated addresses or networks of reverse proxies whose X-Forwarded-Host/"
                          "-Proto/-For headers are trusted; default none (the headers are ignored)")
    lim = p.add_argument_group("request limits (API and queue)")
    lim.add_argument("--max-steps", type=int, default=150, help="most sampling steps one image may ask for")
    lim.add_argument("--max-images", type=int, default=100, help="most images (batch size x batch count) per request")
    lim.add_argument("--max-pixels", type=int, default=2048 * 2048,
                     help="most pixels (width x height, also of the hires. fix size) per image")
    lim.add_argument("--max-prompt-length", type=int, default=20_000, help="most characters in one prompt")
    lim.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image file an API request may send")
    lim.add_argument("--max-queued-per-user", type=int, default=100, help="most jobs one user may have waiting")
    paths = p.add_argument_group("paths")
    paths.add_argument("--data-dir", default=str(REPO_ROOT),
                       help="base folder for models/, outputs/, config.json and user extensions")
    paths.add_argument("--ckpt", default=None, help="checkpoint to load at start (a file anywhere, or a title)")
    paths.add_argument("--ckpt-dir", default=None, help="checkpoints folder (default DATA_DIR/models/Stable-diffusion)")
    paths.add_argument("--vae-dir", default=None, help="VAE folder (default DATA_DIR/models/VAE)")
    paths.add_argument("--embeddings-dir", default=None, help="textual inversion folder (default DATA_DIR/models/embeddings)")
    paths.add_argument("--hypernetwork-dir", default=None, help="hypernetworks folder (default DATA_DIR/models/hypernetworks)")
    paths.add_argument("--lora-dir", default=None, help="LoRA folder (default DATA_DIR/models/Lora)")
    ext = p.add_argument_group("extensions")
    ext.add_argument("--enable-extension", action="append", metavar="NAME",
                     help="enable an extension, run its install.py (if any) and exit; never done while serving")
    ext.add_argument("--disable-extension", action="append", metavar="NAME", help="disable an extension and exit")
    ext.add_argument("--install-extension", action="append", metavar="URL",
                     help="git clone an extension from an https:// URL into DATA_DIR/extensions (disabled) and exit")
    ext.add_argument("--list-extensions", action="store_true", help="list the installed extensions and exit")
    ext.add_argument("--disable-all-extensions", action="store_true", help="start without extensions (built-ins too)")
    ext.add_argument("--disable-extra-extensions", action="store_true", help="start with the built-in extensions only")
    dev = p.add_argument_group("device")
    dev.add_argument("--device", default=None, help="torch device: cuda, cuda:1, mps or cpu (default: best available)")
    dev.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                     help="weights precision on GPU (auto = fp16; CPU always uses fp32)")
    dev.add_argument("--no-half", action="store_true", help="use float32 everywhere, even on a GPU")
    dev.add_argument("--no-hashing", action="store_true", help="do not compute sha256 of checkpoints (titles without hash)")
    return p


@dataclass
class Paths:
    data_dir: Path
    ckpt_dir: Path
    vae_dir: Path
    embeddings_dir: Path
    hypernetwork_dir: Path
    lora_dir: Path
    outputs_dir: Path
    config_file: Path
    cache_dir: Path

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Paths":
        data = Path(args.data_dir).resolve()
        models = data / "models"
        return cls(
            data_dir=data,
            ckpt_dir=Path(args.ckpt_dir or models / "Stable-diffusion").resolve(),
            vae_dir=Path(args.vae_dir or models / "VAE").resolve(),
            embeddings_dir=Path(args.embeddings_dir or models / "embeddings").resolve(),
            hypernetwork_dir=Path(args.hypernetwork_dir or models / "hypernetworks").resolve(),
            lora_dir=Path(args.lora_dir or models / "Lora").resolve(),
            outputs_dir=data / "outputs",
            config_file=data / "config.json",
            cache_dir=data / "cache",
        )

    def create(self) -> None:
        for folder in (self.ckpt_dir, self.vae_dir, self.embeddings_dir, self.hypernetwork_dir, self.lora_dir,
                       self.outputs_dir, self.cache_dir):
            folder.mkdir(parents=True, exist_ok=True)


def parse_logins(auth: str | None, auth_file: str | None) -> dict[str, str]:
    """`user:pass,user2:pass2` (and the same in a file, also one per line) -> {user: pass}."""
    text = ",".join(filter(None, [auth, Path(auth_file).read_text(encoding="utf-8") if auth_file else None]))
    logins = {}
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"Login {item!r} must look like user:password")
        logins[user] = password
    return logins


@dataclass
class App:
    """Owns the settings, the model manager, the job queue and the hooks; hands each part what it needs."""

    args: argparse.Namespace
    paths: Paths
    logins: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        from modules.devices import choose_device
        from modules.hooks import HookRegistry
        from modules.jobs import JobQueue
        from modules.model_manager import ModelManager
        from modules.model_registry import HashCache, ModelRegistry
        from modules.options import Options

        self.paths.create()
        from modules.images import remove_stale_reservations

        stale = remove_stale_reservations(self.paths.outputs_dir)  # half-written saves of a killed process
        if stale:
            log.warning("Removed %d unfinished image file(s) a previous run left in %s", len(stale),
                        self.paths.outputs_dir)
        self.opts = Options(self.paths.config_file)
        self.hooks = HookRegistry()
        self.device = choose_device(self.args.device, self.args.precision, self.args.no_half)
        extra = None
        if self.args.ckpt and Path(self.args.ckpt).is_file():
            extra = Path(self.args.ckpt).resolve()
        self.hash_cache = HashCache(self.paths.cache_dir / "hashes.json")  # checkpoints, VAEs, LoRA, embeddings
        self.registry = ModelRegistry(self.paths.ckpt_dir, self.paths.vae_dir, self.hash_cache,
                                      extra_checkpoint=extra, hashing=not self.args.no_hashing)
        self.registry.refresh()
        self.notices: list[str] = []
        self.models = ModelManager(self.registry, self.device, hooks=self.hooks, on_notice=self._notice)
        from modules.api import ApiProviders

        self.api_providers = ApiProviders()  # what /sdapi/v1 lists for embeddings, LoRA, scripts, ...: extensions fill it
        self._load_extensions()
        from modules.gate import Gate, RequestLimits
        from modules.styles import StyleDatabase
        from modules.worker import LocalWorker

        self.styles = StyleDatabase(self.paths.data_dir / "styles.csv")  # A1111's styles.csv, for every entry point
        self.gate = Gate(RequestLimits.from_args(self.args), self.scripts, self.styles)  # the queue's one door
        self.worker = LocalWorker(opts=self.opts, registry=self.registry, models=self.models, device=self.device,
                                  hooks=self.hooks, extensions=self.extensions, gate=self.gate,
                                  outputs_dir=self.paths.outputs_dir)
        self.queue = JobQueue(self.worker.run, max_queued_per_user=getattr(self.args, "max_queued_per_user", 100))

    def _load_extensions(self) -> None:
        """Extensions (built-in `extensions/` and DATA_DIR/extensions) register their hooks, scripts and settings."""
        from modules.api.extension_providers import fill_api_providers
        from modules.extensions import ExtensionManager
        from modules.scripts import ScriptRegistry

        self.scripts = ScriptRegistry()
        self.extensions = ExtensionManager(
            hooks=self.hooks, scripts=self.scripts, opts=self.opts, paths=self.paths,
            user_dir=self.paths.data_dir / "extensions", hash_cache=self.hash_cache,
            hashing=not self.args.no_hashing, disable_all=getattr(self.args, "disable_all_extensions", False),
            disable_extra=getattr(self.args, "disable_extra_extensions", False))
        self.extensions.load_all()
        fill_api_providers(self.api_providers, self.extensions)
        self.ui_assets = self._extension_ui_assets  # (css, js) for the page

    def _extension_ui_assets(self) -> tuple[str, str]:
        from modules.ui.extension_page import ui_assets  # imports gradio: only once a page is built

        return ui_assets(self.extensions)

    def _notice(self, message: str) -> None:
        log.warning(message)
        if message not in self.notices:
            self.notices.append(message)

    # -- model --------------------------------------------------------------------------
    def load_initial_model(self) -> None:
        wanted = None
        if self.args.ckpt:
            wanted = str(Path(self.args.ckpt).resolve()) if Path(self.args.ckpt).is_file() else self.args.ckpt
            info = self.registry.find_checkpoint(wanted) or self.registry.find_checkpoint(Path(wanted).name)
            wanted = info.title if info else wanted
        elif self.opts.get("sd_model_checkpoint") and self.registry.find_checkpoint(self.opts.get("sd_model_checkpoint")):
            wanted = self.opts.get("sd_model_checkpoint")
        # The wanted checkpoint first, then every other one; a broken file never stops the app from starting.
        candidates = [wanted] if wanted else []
        candidates += [c.title for c in self.registry.checkpoints if c.title != wanted]
        vae = self.opts.get("sd_vae")
        for title in candidates:
            try:
                active = self.models.ensure(title, vae)
                break
            except ValueError as exc:
                self._notice(f"Could not load the checkpoint {title}: {exc}")
                vae = "Automatic"
        else:
            active = self.models.load_builtin()
        log.info("Model ready: %s on %s", active.title, self.device.label)

    # -- jobs ---------------------------------------------------------------------------
    def submit(self, request, owner: str = "local"):
        """Queue a request from any entry point (page, APIs); RequestError (nothing queued) when the gate
        refuses it."""
        plan = self.gate.admit(request)
        return self.queue.submit(plan.request, owner, plan=plan)


def create_server(app: App):
    """The FastAPI app: the APIs (with --api), Gradio page at / (unless --nowebui), one login for all."""
    from fastapi import FastAPI

    from modules.auth import install_security
    from modules.extension_runtime import run_app_started

    server = FastAPI(title="Athanor", docs_url=None, redoc_url=None)  # /docs comes with the API, offline
    app.server = server
    auth = install_security(server, app.args, app.logins, page_mounted=not app.args.nowebui,
                            max_upload_base64=app.gate.limits.max_base64_length)
    if app.args.api or app.args.nowebui:
        from modules.api import mount_api

        mount_api(server, app)  # before Gradio's mount at "/", which would catch every path
    if not app.args.nowebui:
        import gradio as gr

        from modules.ui import build_ui, mount_options

        blocks = build_ui(app)
        run_app_started(app.extensions, server, blocks, app)  # extension routes, before "/" catches every path
        gr.mount_gradio_app(server, blocks, path="/", auth=auth.gradio_auth(), show_error=True,
                            **mount_options(app))
    else:
        run_app_started(app.extensions, server, None, app)
    return server


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.nowebui:
        args.api = True
    if args.enable_extension or args.disable_extension or args.list_extensions or args.install_extension:
        from modules.extension_commands import handle_extension_commands
        from modules.options import Options

        paths = Paths.from_args(args)
        return handle_extension_commands(args, Options(paths.config_file), paths.data_dir / "extensions")
    try:
        logins = parse_logins(args.auth, args.auth_file)
        from modules.auth import auth_config_from_args, check_tls_args

        from modules.auth import HostPolicy

        auth_config_from_args(args, logins)  # --admin-users must name logins
        HostPolicy.from_args(args)  # --allowed-hosts and --forwarded-allow-ips must parse
        check_tls_args(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.listen and not logins and not args.insecure_no_auth:
        print("error: --listen makes the server reachable from the network; add --auth user:password "
              "(or --auth-file FILE). On a network you fully trust, --insecure-no-auth allows it without logins.",
              file=sys.stderr)
        return 2
    if args.listen and not logins:
        log.warning("Listening on the network WITHOUT authentication (--insecure-no-auth): anyone who can reach "
                    "this machine can use it.")
    app = App(args=args, paths=Paths.from_args(args), logins=logins)
    app.load_initial_model()
    app.queue.start()
    server = create_server(app)

    import uvicorn

    host = "0.0.0.0" if args.listen else "127.0.0.1"
    scheme = "https" if args.tls_certfile else "http"
    print(f"Athanor running on {scheme}://{'127.0.0.1' if not args.listen else host}:{args.port}", flush=True)
    try:
        # X-Forwarded-* are judged by our own middleware (--forwarded-allow-ips); uvicorn's proxy handling would
        # trust 127.0.0.1, i.e. any page in a local browser
        uvicorn.run(server, host=host, port=args.port, log_level="warning", proxy_headers=False,
                    ssl_keyfile=args.tls_keyfile, ssl_certfile=args.tls_certfile)
    finally:
        outcome = app.queue.shutdown(wait=10)
        if outcome["cancelled"] or outcome["finished"]:
            log.info("Shutdown: finished %s, cancelled %s", outcome["finished"], outcome["cancelled"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
