"""The LLM servers of one run: for every LLM section with `serve: true` and no `endpoint`, start a
vLLM server (a Ray actor on a GPU node owning the server process, or a local process for the
single-process loop), point the section's `endpoint` at it, and stop them all when the run ends."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config, _set

# Config sections that talk to an LLM server, and the stage that uses each.
LLM_SECTIONS = {"captions": "music_captions", "llm": "prompt_fusion"}


@dataclass
class Servers:
    started: list[tuple[str, Any, str]] = field(default_factory=list)  # (section, handle, base_url)

    def stop(self) -> None:
        from pipeline.llm.server import VllmServer, stop_server_actor

        for section, handle, _ in reversed(self.started):
            try:
                if isinstance(handle, VllmServer):  # the single-process loop's own server
                    handle.stop()
                else:
                    stop_server_actor(handle)
            except Exception as exc:  # noqa: BLE001 - one stuck server must not hide the run's result
                print(f"[build] warning: stopping the {section} server failed: {exc}", flush=True)
        self.started.clear()

    def describe(self) -> dict[str, str]:
        return {section: url for section, _, url in self.started}


def start_servers(config: Config, use_ray: bool, quiet: bool = False) -> tuple[Config, Servers]:
    """Start the servers the config asks for; returns the config with their endpoints filled in."""
    servers = Servers()
    data = config.model_dump()
    try:
        for section, stage in LLM_SECTIONS.items():
            cfg = getattr(config, section)
            if stage not in config.stages or not cfg.serve or cfg.endpoint:
                continue
            if not quiet:
                print(f"[build] starting a vLLM server for {section} ({cfg.model}) ...", flush=True)
            if use_ray:
                from pipeline.llm.server import start_server_actor

                handle, url = start_server_actor(f"{section}-server-{uuid.uuid4().hex[:6]}", cfg)
            else:
                from pipeline.llm.server import VllmServer

                handle = VllmServer.from_section(cfg)
                servers.started.append((section, handle, ""))  # stopped even if it never comes up
                handle.start()
                handle.wait_ready()
                url = handle.base_url
                servers.started.pop()
            servers.started.append((section, handle, url))
            _set(data, [section, "endpoint"], url)
            if not quiet:
                print(f"[build] {section} server ready at {url}", flush=True)
    except BaseException:
        servers.stop()
        raise
    return Config.model_validate(data), servers
