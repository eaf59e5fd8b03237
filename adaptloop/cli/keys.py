"""`adaptloop keys`: the keyring of encryption at rest (core/encryption.py).

    adaptloop keys init --keyring PATH       # a new keyring, one key, mode 0600 (outside the storage root)
    adaptloop keys init --if-missing         # the same, unless it exists (docker-compose's `keys` service)
    adaptloop keys rotate                    # a new current key; every data key re-wrapped under it
    adaptloop keys retire KEY_ID             # remove an old key (refused while any data key needs it)
    adaptloop keys list                      # each key: current or not, how many data keys it wraps

`--keyring` defaults to `storage.encryption.keyring`. Rotation touches only
the small key files under `privacy/keys/` in the storage root, never an
artifact; a rotation killed midway leaves every file readable (old and new
key are both in the keyring) and is finished by running it again.
`scripts/rotate_adapter_keys.sh` runs `rotate` for cron.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from adaptloop.cli.context import CliContext, cli, pass_ctx
from core.errors import ConfigError

KEYRING = click.option(
    "--keyring",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="the keyring file (default: storage.encryption.keyring)",
)


@cli.group()
def keys() -> None:
    """Encryption at rest: create, rotate and retire the key-encryption keys."""


def _keyring_path(ctx: CliContext, keyring: Path | None) -> Path:
    from core.encryption import keyring_outside

    path = keyring or ctx.settings.storage.encryption.keyring
    if path is None:
        raise ConfigError("no keyring: pass --keyring PATH or set storage.encryption.keyring")
    keyring_outside(ctx.settings.storage_root, path)
    return path.expanduser().resolve()


def _opened(ctx: CliContext, keyring: Path | None):
    from core.encryption import Keyring
    from core.storage import ArtifactStore

    return ArtifactStore(ctx.settings.storage_root), Keyring(_keyring_path(ctx, keyring))


@keys.command("init")
@KEYRING
@click.option("--if-missing", is_flag=True, help="keep an existing keyring (for start-up scripts) instead of refusing")
@pass_ctx
def keys_init(ctx: CliContext, keyring: Path | None, if_missing: bool) -> None:
    """Create a keyring with one key (mode 0600); refuses to overwrite one."""
    from core.encryption import Keyring

    path = _keyring_path(ctx, keyring)
    if if_missing and path.exists():
        click.echo(f"keyring {path} exists: kept (current key {Keyring(path).current})")
        return
    created = Keyring.create(path)
    click.echo(f"keyring {created.path} created with key {created.current} (mode 0600; keep a copy outside the storage root)")


@keys.command("rotate")
@KEYRING
@pass_ctx
def keys_rotate(ctx: CliContext, keyring: Path | None) -> None:
    """Add a key, make it current and re-wrap every data key under it (no artifact is re-encrypted)."""
    from core.encryption import rotate

    store, ring = _opened(ctx, keyring)
    before = ring.ids()

    def progress(done: int, total: int) -> None:
        if done % 1000 == 0 or done == total:
            print(f"  re-wrapped {done}/{total} data keys", file=sys.stderr, flush=True)

    result = rotate(store, ring, progress)
    click.echo(
        f"new current key {result.new_key}: {result.rewrapped} data key(s) re-wrapped, {result.already} already under it, "
        f"in {result.seconds:.2f} s"
    )
    if before:
        click.echo(f"old key(s) now unused: {', '.join(before)} (remove each with `adaptloop keys retire KEY_ID`)")


@keys.command("retire")
@click.argument("key_id")
@KEYRING
@pass_ctx
def keys_retire(ctx: CliContext, key_id: str, keyring: Path | None) -> None:
    """Remove KEY_ID from the keyring; refused while it is current or any data key is still wrapped by it."""
    from core.encryption import retire

    store, ring = _opened(ctx, keyring)
    retire(store, ring, key_id)
    click.echo(f"key {key_id} retired; the keyring holds {', '.join(ring.ids())}")


@keys.command("list")
@KEYRING
@pass_ctx
def keys_list(ctx: CliContext, keyring: Path | None) -> None:
    """Each key of the keyring: whether it is current and how many data keys it wraps."""
    from core.encryption import keyring_summary

    store, ring = _opened(ctx, keyring)
    for row in keyring_summary(store, ring):
        mark = "current" if row["current"] else "old"
        click.echo(f"{row['id']}  {mark:7}  wraps {row['data_keys']} data key(s)")
