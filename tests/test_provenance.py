"""C2PA Content Credentials (ditkit.provenance): a local test CA signs a PNG, verify reads it back."""

import json
import stat

import pytest

pytest.importorskip("c2pa", reason="c2pa-python is not installed (pip install c2pa-python)")
pytest.importorskip("cryptography")

from PIL import Image  # noqa: E402

from ditkit import __version__  # noqa: E402
from ditkit.errors import ConfigError  # noqa: E402
from ditkit.provenance import (  # noqa: E402
    DIGITAL_SOURCE_TYPE,
    SELF_SIGNED_NOTICE,
    generation_manifest,
    load_credentials,
    make_self_signed,
    sha256_file,
    sign_png,
    verify,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_self_signed(tmp_path_factory.mktemp("creds"))


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "sample.png"
    Image.new("RGB", (16, 16), (20, 180, 40)).save(path)
    return path


def manifest(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"weights")
    return generation_manifest(
        model="DiT-S/2", checkpoint_sha256=sha256_file(ckpt),
        sampler={"name": "ddim", "num_inference_steps": 50, "guidance_scale": 4.0}, seed=1234, title="sample.png",
    )


def test_self_signed_pair_is_said_and_key_is_private(pair):
    assert "SELF-SIGNED" in SELF_SIGNED_NOTICE
    assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
    chain, key, alg = load_credentials(pair.cert, pair.key)
    assert alg == "es256" and chain.count(b"BEGIN CERTIFICATE") == 2 and b"PRIVATE KEY" in key
    with pytest.raises(ConfigError, match="already exists"):
        make_self_signed(pair.cert.parent)


def test_sign_and_verify_round_trip(pair, png, tmp_path):
    out = sign_png(png, tmp_path / "signed.png", manifest(tmp_path), pair.cert, pair.key)
    report = verify(out)
    assert report["signed"] and report["valid"] and report["state"] == "Valid" and not report["trusted"]
    assert report["failures"] == ["signingCredential.untrusted"]  # a local test root: valid, not trusted
    assert report["digital_source_type"] == DIGITAL_SOURCE_TYPE
    assert report["software"]["name"] == "ditkit" and report["software"]["version"] == __version__
    gen = report["generation"]
    assert gen["model"] == "DiT-S/2" and gen["seed"] == 1234 and gen["sampler"]["name"] == "ddim"
    assert gen["checkpoint_sha256"] == sha256_file(tmp_path / "model.safetensors") and len(gen["checkpoint_sha256"]) == 64
    assert report["signer"]["common_name"] == "ditkit test signer"
    with Image.open(out) as im:  # still a PNG with the same pixels
        assert im.size == (16, 16) and im.getpixel((3, 3)) == (20, 180, 40)
    trusted = verify(out, trust_anchors=pair.root)
    assert trusted["state"] == "Trusted" and trusted["trusted"] and trusted["valid"] and trusted["failures"] == []


def test_edited_pixels_fail_validation(pair, png, tmp_path):
    out = sign_png(png, tmp_path / "signed.png", manifest(tmp_path), pair.cert, pair.key)
    data = bytearray(out.read_bytes())
    idat = data.index(b"IDAT") + 8  # a byte inside the compressed pixel data
    data[idat] ^= 0xFF
    out.write_bytes(bytes(data))
    report = verify(out)
    assert report["signed"] and not report["valid"] and report["state"] == "Invalid"
    assert any("dataHash" in code or "hash" in code.lower() for code in report["failures"]), report["failures"]


def test_unsigned_png_reports_no_manifest(png):
    report = verify(png)
    assert report["signed"] is False and report["state"] is None and not report["valid"]


def test_sign_in_place_and_manifest_must_be_json(pair, png, tmp_path):
    sign_png(png, png, manifest(tmp_path), pair.cert, pair.key)
    assert verify(png)["valid"]
    with pytest.raises(ConfigError, match="JSON"):
        generation_manifest(model="m", checkpoint_sha256=None, sampler={"f": object()}, seed=0)


def self_signed_leaf(pair, path):
    """A self-signed certificate for the pair's own key (what C2PA refuses)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = serialization.load_pem_private_key(pair.key.read_bytes(), None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize(
    "broken,message",
    [
        ("cert", "is not a PEM certificate chain"),
        ("key", "is not a PEM private key"),
        ("mismatch", "does not belong to the first certificate"),
        ("selfsigned_leaf", "self-signed leaf, which C2PA refuses"),
        ("not_png", "is not a PNG file"),
    ],
)
def test_corrupt_credentials_are_one_line_errors(pair, png, tmp_path, broken, message):
    cert, key, src = pair.cert, pair.key, png
    if broken == "cert":
        cert = tmp_path / "bad-cert.pem"
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all!!\n-----END CERTIFICATE-----\n")
    elif broken == "key":
        key = tmp_path / "bad-key.pem"
        key.write_bytes(pair.key.read_bytes()[:60])
    elif broken == "mismatch":
        key = make_self_signed(tmp_path / "other").key
    elif broken == "selfsigned_leaf":
        cert = self_signed_leaf(pair, tmp_path / "self.pem")
    else:
        src = tmp_path / "fake.png"
        src.write_bytes(b"GIF89a not a png")
    dst = tmp_path / "out.png"
    with pytest.raises(ConfigError, match=message) as e:
        sign_png(src, dst, manifest(tmp_path), cert, key)
    assert "\n" not in str(e.value)
    assert not dst.exists()  # nothing written half
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_missing_files_name_the_flag(tmp_path, pair):
    with pytest.raises(ConfigError, match="--c2pa-cert .* does not exist"):
        load_credentials(tmp_path / "none.pem", pair.key)
    with pytest.raises(ConfigError, match="does not exist"):
        verify(tmp_path / "none.png")


def test_manifest_shape():
    m = generation_manifest(model="m", checkpoint_sha256="ab", sampler={"name": "euler"}, seed=None)
    actions = m["assertions"][0]["data"]["actions"]
    assert actions[0]["digitalSourceType"].endswith("trainedAlgorithmicMedia")
    json.dumps(m)


def test_c2pa_refusal_becomes_a_one_line_config_error(pair, png, tmp_path, monkeypatch):
    """Past our own checks, c2pa itself refuses a self-signed leaf ("the certificate is invalid")."""
    import ditkit.provenance as provenance

    leaf = self_signed_leaf(pair, tmp_path / "self.pem").read_bytes()
    monkeypatch.setattr(provenance, "load_credentials", lambda cert, key: (leaf, pair.key.read_bytes(), "es256"))
    with pytest.raises(ConfigError, match="C2PA signing failed") as e:
        sign_png(png, tmp_path / "out.png", manifest(tmp_path), pair.cert, pair.key)
    assert "\n" not in str(e.value) and not (tmp_path / "out.png").exists()


def test_a_file_that_is_not_an_image_is_a_config_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(ConfigError, match="cannot read C2PA data"):
        verify(path)
