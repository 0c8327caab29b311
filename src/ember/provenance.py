"""Provenance: every image says it was generated, by which model, trained on what (issue 40).

Three marks, the first two readable by tools that know nothing of ember:
- Content Credentials (C2PA 2.x, through `c2pa-python`): a signed manifest in the PNG with a
  `c2pa.created` action whose digitalSourceType is IPTC's `trainedAlgorithmicMedia`, the software
  (ember and its version), the model (name, sha256, and the licences and attributions of its model
  card) and, for img2img and inpainting, the input image as an ingredient. The manifest hashes the
  whole file, so any edit (one pixel) makes it read as tampered.
- IPTC's DigitalSourceType in the PNG's XMP, for readers of plain metadata.
- An invisible watermark in the pixels (`ember.watermark`), which outlives the metadata: a JPEG
  re-encode, a screenshot's PNG, and at 512 pixels a side and more a resize.

Signing uses the user's certificate chain and key (`--c2pa-cert`/`--c2pa-key`), else a local ES256
chain (a root CA and a leaf) that ember makes once in its config folder. Readers then report the
credentials as valid but the signer as untrusted: the image says who made it, not that a third
party vouches for it.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError
from ember.files import write_atomic

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
XMP_KEY = "XML:com.adobe.xmp"  # the iTXt keyword Adobe's XMP spec (part 3) gives PNG
MODEL_CARD = "model_card.json"
UNTRUSTED = "signingCredential.untrusted"  # a local or self-made chain: no trust list names it


@dataclass(frozen=True)
class Provenance:
    """What an encoded PNG carries beyond its pixels and record."""

    credentials: bool = True  # C2PA manifest and XMP
    watermark: bool = True  # the invisible mark in the pixels (`ember.watermark`)
    cert: Path | None = None  # PEM chain, leaf first; None: the local chain
    key: Path | None = None  # PEM private key of the leaf


ON = Provenance()  # the default: every image carries every mark
OFF = Provenance(credentials=False, watermark=False)


@dataclass(frozen=True)
class Claim:
    """What the manifest states about one image."""

    title: str
    software_version: str
    model_name: str
    model_sha256: str
    model_path: str
    mode: str = "txt2img"
    ingredients: tuple[tuple[str, bytes], ...] = ()  # (title, PNG bytes): the images put in


@dataclass(frozen=True)
class CredentialReport:
    state: str  # "valid" | "tampered" | "invalid" | "absent"
    manifest: dict[str, Any] = field(default_factory=dict)
    failures: tuple[str, ...] = ()  # c2pa failure codes, e.g. assertion.dataHash.mismatch

    @property
    def source_type(self) -> str | None:
        for action in _actions(self.manifest):
            if action.get("action") == "c2pa.created":
                return action.get("digitalSourceType")
        return None

    @property
    def model(self) -> dict[str, Any]:
        for assertion in self.manifest.get("assertions", []):
            if assertion.get("label") == "org.ember.model":
                return assertion.get("data", {})
        return {}


def add_provenance_args(p) -> None:
    """The flags that turn off or re-sign what every PNG carries (see `ember.provenance`)."""
    p.add_argument(
        "--no-credentials",
        action="store_true",
        help="no signed Content Credentials (C2PA) or XMP source type in the PNGs",
    )
    p.add_argument(
        "--c2pa-cert",
        help="PEM certificate chain to sign Content Credentials with "
        "(default: a local chain made in $EMBER_CONFIG or ~/.config/ember)",
    )
    p.add_argument("--c2pa-key", help="PEM private key of --c2pa-cert's first certificate")
    p.add_argument(
        "--no-watermark",
        action="store_true",
        help="no invisible watermark in the pixels (the PNG record says so)",
    )


def provenance_from_args(args) -> Provenance:
    if bool(args.c2pa_cert) != bool(args.c2pa_key):
        raise EmberError("--c2pa-cert and --c2pa-key go together: give both or neither")
    return Provenance(
        credentials=not args.no_credentials,
        watermark=not args.no_watermark,
        cert=Path(args.c2pa_cert) if args.c2pa_cert else None,
        key=Path(args.c2pa_key) if args.c2pa_key else None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# model cards


def find_model_card(model_path: str | Path) -> Path | None:
    """`model_card.json` beside a single file, or inside a diffusers folder."""
    path = Path(model_path)
    for candidate in (path / MODEL_CARD, path.parent / MODEL_CARD):
        if candidate.is_file():
            return candidate
    return None


def card_licences(card: dict[str, Any]) -> dict[str, Any]:
    """The licences and attributions of a model card: ember's training cards (`data.sources`,
    or `stages[].data.sources` for a shipped model) and plain cards (`license(s)`,
    `attributions`)."""
    sources = list(card.get("data", {}).get("sources", []))
    for stage in card.get("stages", []):
        sources += stage.get("data", {}).get("sources", [])
    licences = [s.get("spdx") or s.get("license") for s in sources]
    plain = card.get("licenses", card.get("license", []))
    licences += [plain] if isinstance(plain, str) else list(plain)
    attributions = [s.get("attribution") for s in sources] + list(card.get("attributions", []))
    out: dict[str, Any] = {
        "licences": sorted({x for x in licences if x}),
        "attributions": sorted({x for x in attributions if x}),
    }
    if isinstance(card.get("text_encoder"), str):
        out["text_encoder"] = card["text_encoder"]
    if card.get("sha256"):
        out["card_sha256"] = card["sha256"]
    return out


def read_model_card(model_path: str | Path) -> dict[str, Any] | None:
    path = find_model_card(model_path)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EmberError(f"unreadable model card {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# signing


def config_dir() -> Path:
    return Path(os.environ.get("EMBER_CONFIG") or Path.home() / ".config" / "ember")


def local_signing_files() -> tuple[Path, Path]:
    """The local chain and key, made on first use: a root CA and an ES256 leaf that may only sign
    (critical digitalSignature, emailProtection, not a CA), as C2PA's signer profile requires."""
    folder = config_dir() / "c2pa"
    chain, key = folder / "ember-local-chain.pem", folder / "ember-local-key.pem"
    if chain.is_file() and key.is_file():
        return chain, key
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    # Two workers (threads or processes) making the pair at once would leave one's chain beside
    # the other's key: make it under a lock, and only if nobody did meanwhile.
    with _LOCAL_LOCK, open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if chain.is_file() and key.is_file():
            return chain, key
        _make_local_signing_files(folder, chain, key)
    return chain, key


_LOCAL_LOCK = threading.Lock()  # flock locks a process, not its threads


def _make_local_signing_files(folder: Path, chain: Path, key: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ember (local)")])  # fmt: skip

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=sign, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=not sign,
            crl_sign=not sign, encipher_only=False, decipher_only=False,
        )  # fmt: skip

    now = datetime.datetime.now(datetime.UTC)
    root_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )

    def cert(subject: str, issuer: x509.Name, public, signer, ca: bool):
        b = (
            x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650 if ca else 1825))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
            .add_extension(usage(sign=not ca), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
        )  # fmt: skip
        if not ca:
            b = b.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False
            )
            b = b.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
            )
        return b.sign(signer, hashes.SHA256())

    root = cert("ember local root", name("ember local root"), root_key.public_key(), root_key, True)
    leaf = cert("ember local signer", root.subject, leaf_key.public_key(), root_key, False)
    pem = serialization.Encoding.PEM
    write_atomic(chain, leaf.public_bytes(pem) + root.public_bytes(pem))
    private = leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(key, private)
    key.chmod(0o600)
    print(f"ember: made a local signing certificate for Content Credentials in {folder} "
          "(pass --c2pa-cert/--c2pa-key to sign as yourself)", file=sys.stderr)  # fmt: skip


def _signing_pems(options: Provenance) -> tuple[bytes, bytes]:
    if (options.cert is None) != (options.key is None):
        raise EmberError("--c2pa-cert and --c2pa-key go together: give both or neither")
    chain, key = (options.cert, options.key) if options.cert else local_signing_files()
    try:
        return Path(chain).read_bytes(), Path(key).read_bytes()
    except OSError as exc:
        raise EmberError(f"cannot read the signing certificate or key: {exc}") from None


def manifest_definition(claim: Claim) -> dict[str, Any]:
    model = {"name": claim.model_name, "sha256": claim.model_sha256}
    card = read_model_card(claim.model_path)
    model_data = dict(model)
    if card is None:
        model_data["model_card"] = None  # said, not left out: the file carries no licence record
    else:
        model_data.update(card_licences(card))
    software = {"name": "ember", "version": claim.software_version}
    return {
        "claim_generator_info": [software],
        "title": claim.title,
        "format": "image/png",
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": DIGITAL_SOURCE_TYPE,
                            "softwareAgent": software,
                            "parameters": {"model": model, "mode": claim.mode},
                        }
                    ]
                },
            },  # fmt: skip
            {"label": "org.ember.model", "data": model_data},
        ],
    }


def sign_png(png: bytes, claim: Claim, options: Provenance) -> bytes:
    """The PNG with a signed C2PA manifest embedded (a `caBX` chunk)."""
    import c2pa

    chain, key = _signing_pems(options)
    try:
        signer = c2pa.Signer.from_info(
            c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain, key, None)
        )
        builder = c2pa.Builder(manifest_definition(claim))
        for title, data in claim.ingredients:
            builder.add_ingredient(
                {"title": title, "relationship": "inputTo"}, "image/png", io.BytesIO(data)
            )
        out = io.BytesIO()
        builder.sign(signer, "image/png", io.BytesIO(png), out)
    except c2pa.C2paError as exc:
        raise EmberError(f"cannot sign the Content Credentials: {exc}") from None
    return out.getvalue()


def read_credentials(png: bytes) -> CredentialReport:
    """Validate a PNG's manifest: valid (signature and hashes hold, trusted signer or not),
    tampered (the file no longer matches what was signed), invalid, or absent."""
    import c2pa

    try:
        reader = c2pa.Reader("image/png", io.BytesIO(png))
    except c2pa.C2paError:
        return CredentialReport("absent")
    with reader:
        manifest = reader.get_active_manifest() or {}
        state = reader.get_validation_state() or ""
        results = reader.get_validation_results() or {}
    codes = [f.get("code", "") for f in results.get("activeManifest", {}).get("failure", [])]
    failures = tuple(c for c in codes if c != UNTRUSTED)  # who signed is a separate question
    if state in ("Valid", "Trusted") and not failures:
        return CredentialReport("valid", manifest)
    tampered = any("mismatch" in code for code in failures)
    return CredentialReport("tampered" if tampered else "invalid", manifest, failures)


def _actions(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    for assertion in manifest.get("assertions", []):
        if assertion.get("label", "").startswith("c2pa.actions"):
            return assertion.get("data", {}).get("actions", [])
    return []


# ---------------------------------------------------------------------------------------------
# XMP


def xmp_packet() -> str:
    """IPTC Photo Metadata's DigitalSourceType (Iptc4xmpExt), the field search engines and photo
    tools read to label generated images."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" '
        'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        'xmlns:xmp="http://ns.adobe.com/xap/1.0/">'
        f"<Iptc4xmpExt:DigitalSourceType>{DIGITAL_SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType>"
        "<xmp:CreatorTool>ember</xmp:CreatorTool>"
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="r"?>'
    )


def xmp_source_type(xmp: str | None) -> str | None:
    import re

    found = re.search(r"<Iptc4xmpExt:DigitalSourceType>([^<]*)<", xmp or "")
    return found.group(1) if found else None
