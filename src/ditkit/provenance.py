"""C2PA Content Credentials for generated images (``c2pa-python``; https://c2pa.org).

A signed PNG carries a manifest saying it was made by a trained model
(``digitalSourceType`` = IPTC ``trainedAlgorithmicMedia``), by which software, model, checkpoint
(sha256), sampler settings and seed, signed with the user's certificate and key. Anyone can read
and validate it (``verify`` here, ``c2patool``, or https://contentcredentials.org/verify).

Certificates. C2PA validators (c2pa-rs, under ``c2pa-python``) accept a signing certificate only if

* it is an end-entity certificate (``CA:FALSE``) issued by *another* certificate: a self-signed
  leaf is refused at signing with "the certificate is invalid" (measured with c2pa-python 0.38.1,
  c2pa-rs 0.91.3);
* it has key usage ``digitalSignature`` and an extended key usage such as ``emailProtection``
  (or documentSigning / the C2PA claim-signing purpose);
* its key is one of ES256 / ES384 / ES512 (EC P-256 / P-384 / P-521), PS256 (RSA-PSS) or Ed25519.

``make_self_signed`` builds such a pair for *testing*: a local root CA that signs itself and a
leaf it issues. It is self-signed at the root, so no one else trusts it; ``verify`` reports such
files as ``Valid`` (the signature and the image hash check out) but not ``Trusted`` unless the
root is passed as ``trust_anchors``. Real credentials come from a CA in the C2PA trust list.

Signing happens offline (no timestamp authority is contacted; ``ta_url`` is not set), so the
signature's validity ends with the certificate's.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditkit import __version__
from ditkit.errors import ConfigError
from ditkit.fileio import write_bytes

__all__ = [
    "DIGITAL_SOURCE_TYPE",
    "GENERATION_LABEL",
    "SELF_SIGNED_NOTICE",
    "Credentials",
    "generation_manifest",
    "load_credentials",
    "make_self_signed",
    "sha256_file",
    "sign_png",
    "verify",
]

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION_LABEL = "org.ditkit.generation"  # our own assertion: model, checkpoint, sampler, seed
SELF_SIGNED_NOTICE = (
    "these C2PA credentials are SELF-SIGNED test credentials (a local root CA made by ditkit): "
    "images verify as Valid but nobody else trusts them; use a certificate from a C2PA-trusted CA "
    "for anything published"
)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _c2pa() -> Any:
    try:
        import c2pa
    except ImportError:
        raise ConfigError("C2PA credentials need c2pa-python: pip install c2pa-python") from None
    return c2pa


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (e.g. ``model.safetensors``), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Credentials:
    """Files of a signing pair: ``cert`` (PEM chain, leaf first), ``key`` (PEM private key) and,
    for ``make_self_signed`` pairs, ``root`` (the test root CA, the trust anchor for ``verify``)."""

    cert: Path
    key: Path
    root: Path | None = None


def make_self_signed(directory: str | Path, *, days: int = 365, overwrite: bool = False) -> Credentials:
    """Write a SELF-SIGNED test pair into ``directory`` (see the module docstring).

    Files: ``c2pa-test-root.pem`` (root CA, ES256, self-signed), ``c2pa-test-cert.pem`` (leaf
    issued by the root, then the root: the chain to sign with), ``c2pa-test-key.pem`` (the leaf's
    EC P-256 key, PKCS#8, mode 0600). Show ``SELF_SIGNED_NOTICE`` to the user.

    Raises:
        ConfigError: a file exists and ``overwrite`` is off; ``days < 1``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise ConfigError(f"days={days}: a certificate must be valid for at least 1 day")
    directory = Path(directory)
    paths = Credentials(directory / "c2pa-test-cert.pem", directory / "c2pa-test-key.pem", directory / "c2pa-test-root.pem")
    existing = [p for p in (paths.cert, paths.key, paths.root) if p is not None and p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists; remove it or choose another directory")
    directory.mkdir(parents=True, exist_ok=True)

    def name(common: str) -> x509.Name:
        return x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, common),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ditkit self-signed test (not trusted)"),
        ])

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                 encipher_only=False, decipher_only=False)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (
        x509.CertificateBuilder().subject_name(name("ditkit test root CA")).issuer_name(name("ditkit test root CA"))
        .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(name("ditkit test signer")).issuer_name(root.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    assert paths.root is not None
    paths.root.write_bytes(root.public_bytes(pem))
    paths.cert.write_bytes(leaf.public_bytes(pem) + root.public_bytes(pem))
    key_bytes = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    return paths


def load_credentials(cert: str | Path, key: str | Path) -> tuple[bytes, bytes, str]:
    """Read and check a signing pair before C2PA sees it: ``(chain_pem, key_pem, alg)``.

    Raises:
        ConfigError (one line): a file is missing or not PEM; the key is encrypted; the key does
            not match the first certificate; the leaf is self-signed, a CA, expired or not yet
            valid; the key type is not one C2PA signs with.
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    cert, key = Path(cert), Path(key)
    for path, what in ((cert, "--c2pa-cert"), (key, "--c2pa-key")):
        if not path.is_file():
            raise ConfigError(f"{what} {path} does not exist; make a test pair with `ditkit credentials init DIR`")
    chain_pem, key_pem = cert.read_bytes(), key.read_bytes()
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise ConfigError(f"--c2pa-cert {cert} is not a PEM certificate chain (leaf first); check the file") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"--c2pa-key {key} is encrypted; give an unencrypted PEM key (PKCS#8)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"--c2pa-key {key} is not a PEM private key; check the file") from None
    leaf = chain[0]
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(serialization.Encoding.DER, pub) != leaf.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ):
        raise ConfigError(f"--c2pa-key {key} does not belong to the first certificate in {cert}")
    if isinstance(private, ec.EllipticCurvePrivateKey):
        alg = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}.get(private.curve.name)
    elif isinstance(private, rsa.RSAPrivateKey):
        alg = "ps256"
    elif isinstance(private, ed25519.Ed25519PrivateKey):
        alg = "ed25519"
    else:
        alg = None
    if alg is None:
        raise ConfigError(f"--c2pa-key {key}: C2PA signs with EC P-256/384/521, RSA (PS256) or Ed25519 keys only")
    if leaf.issuer == leaf.subject:
        raise ConfigError(
            f"--c2pa-cert {cert} is a self-signed leaf, which C2PA refuses; sign it with a CA "
            "(`ditkit credentials init DIR` makes a test CA and leaf)"
        )
    try:
        is_ca = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise ConfigError(f"--c2pa-cert {cert}: the first certificate is a CA; put the signing (leaf) certificate first")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise ConfigError(
            f"--c2pa-cert {cert} is valid {leaf.not_valid_before_utc:%Y-%m-%d} to {leaf.not_valid_after_utc:%Y-%m-%d}, "
            "not now; renew it"
        )
    return chain_pem, key_pem, alg


def generation_manifest(
    *,
    model: str,
    checkpoint_sha256: str | None,
    sampler: dict[str, Any],
    seed: int | None,
    title: str = "image.png",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest definition ``sign_png`` writes: a ``c2pa.created`` action with the
    trainedAlgorithmicMedia source type and ditkit as software agent, and an
    ``org.ditkit.generation`` assertion with ``model``, ``checkpoint_sha256``, ``sampler`` (e.g.
    ``{"name": "ddim", "num_inference_steps": 50, "guidance_scale": 4.0}``), ``seed`` and ``extra``.
    Values must be JSON-serialisable."""
    generation = {"model": model, "checkpoint_sha256": checkpoint_sha256, "sampler": dict(sampler), "seed": seed,
                  **(extra or {})}
    try:
        json.dumps(generation)
    except TypeError as err:
        raise ConfigError(f"C2PA manifest values must be JSON (str, number, list, dict): {err}") from None
    software = {"name": "ditkit", "version": __version__}
    return {
        "claim_generator_info": [software],
        "title": title,
        "format": "image/png",
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [
                {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE, "softwareAgent": software}
            ]}},
            {"label": GENERATION_LABEL, "data": generation},
        ],
    }


def sign_png(src: str | Path, dst: str | Path, manifest: dict[str, Any], cert: str | Path, key: str | Path) -> Path:
    """Embed a signed C2PA manifest into PNG ``src`` and write it to ``dst`` (may equal ``src``).

    ``dst`` is written through a temporary file in its folder and renamed, so a failure leaves
    no half-written image. Returns ``dst``.

    Raises:
        ConfigError (one line): bad credentials (``load_credentials``), ``src`` not a PNG,
            c2pa refusing the certificate or manifest.
    """
    c2pa = _c2pa()
    chain_pem, key_pem, alg = load_credentials(cert, key)
    src, dst = Path(src), Path(dst)
    data = src.read_bytes()
    if not data.startswith(_PNG_MAGIC):
        raise ConfigError(f"{src} is not a PNG file; C2PA signing here writes PNGs only")
    try:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg, chain_pem, key_pem, None))
        builder = c2pa.Builder(json.dumps(manifest))
        out = io.BytesIO()
        builder.sign(signer, "image/png", io.BytesIO(data), out)
    except c2pa.C2paError as err:
        message = " ".join(str(err).split())
        raise ConfigError(f"C2PA signing failed: {message} (cert {cert}, key {key})") from None
    return write_bytes(dst, out.getvalue())


def verify(path: str | Path, trust_anchors: str | Path | None = None) -> dict[str, Any]:
    """Read and validate the C2PA manifest of an image.

    Args:
        trust_anchors: optional PEM file of root certificates to trust (e.g. the
            ``c2pa-test-root.pem`` of ``make_self_signed``); without it nothing is ``trusted``.

    Returns:
        ``{"path", "signed", "state", "valid", "trusted", "failures", "signer", "software",
        "digital_source_type", "generation"}``: ``signed`` False (and the rest empty) when the
        file has no manifest; ``state`` is c2pa's ``"Invalid"``, ``"Valid"`` (signature and
        content hash check out) or ``"Trusted"`` (also chained to a trust anchor); ``valid`` is
        ``state`` in Valid/Trusted; ``failures`` the failure codes (``"signingCredential.untrusted"``
        for a Valid but untrusted signer; e.g. ``"assertion.dataHash.mismatch"`` after an edit); ``signer``
        ``{"issuer", "common_name", "alg"}``; ``generation`` the ``org.ditkit.generation`` data.

    Raises:
        ConfigError: the file is missing or not an image c2pa reads.
    """
    c2pa = _c2pa()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    report: dict[str, Any] = {"path": str(path), "signed": False, "state": None, "valid": False, "trusted": False,
                              "failures": [], "signer": None, "software": None, "digital_source_type": None,
                              "generation": None}
    context = None
    if trust_anchors is not None:
        anchors = Path(trust_anchors)
        if not anchors.is_file():
            raise ConfigError(f"trust anchors file {anchors} does not exist")
        settings = {"verify": {"verify_trust": True}, "trust": {"user_anchors": anchors.read_text()}}
        context = c2pa.Context(c2pa.Settings.from_dict(settings))
    try:
        with open(path, "rb") as f:
            reader = c2pa.Reader(None, f, context=context) if context else c2pa.Reader(None, f)
            store = json.loads(reader.json())
    except c2pa.C2paError as err:
        if type(err).__name__.endswith("ManifestNotFound"):
            return report
        raise ConfigError(f"{path}: cannot read C2PA data: {' '.join(str(err).split())}") from None
    manifest = store.get("manifests", {}).get(store.get("active_manifest") or "", {})
    if not manifest:
        return report
    state = store.get("validation_state")
    failures = [item.get("code") for item in store.get("validation_status") or [] if item.get("code")]
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    failures += [item.get("code") for item in results.get("failure", []) if item.get("code") not in failures]
    actions = [a for assertion in manifest.get("assertions", []) if assertion.get("label", "").startswith("c2pa.actions")
               for a in assertion.get("data", {}).get("actions", [])]
    created = next((a for a in actions if a.get("action") == "c2pa.created"), {})
    generation = next((a.get("data") for a in manifest.get("assertions", []) if a.get("label") == GENERATION_LABEL), None)
    info = manifest.get("signature_info") or {}
    report.update(
        signed=True,
        state=state,
        valid=state in ("Valid", "Trusted"),
        trusted=state == "Trusted",
        failures=failures,
        signer={"issuer": info.get("issuer"), "common_name": info.get("common_name"), "alg": info.get("alg")},
        software=(manifest.get("claim_generator_info") or [{}])[0],
        digital_source_type=created.get("digitalSourceType"),
        generation=generation,
    )
    return report
