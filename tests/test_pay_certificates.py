"""`newsbot pay certificates` through the real CLI against the fake WeChat Pay as a process:
the downloaded certificate is saved and then verifies answers by its serial; a forged answer
or a wrong APIv3 key writes nothing; a rerun keeps what is there."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from typer.testing import CliRunner, Result

from bot.cli import app as cli_app
from bot.pay.certificates import CertificateRefused, decrypt_certificates
from bot.pay.client import PayApiError, PayClient
from bot.pay.fake import FakeWeChatPay, _rsa_key, _self_signed
from bot.pay.keys import load_certificates
from bot.pay.signing import encrypt_resource
from bot.settings import load_settings
from tests.conftest import TOKEN
from tests.pay_page_support import FakePayProcess, fake_pay_process
from tests.pay_support import identity


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakePayProcess]:
    with fake_pay_process(tmp_path_factory.mktemp("fakepay")) as f:
        yield f


@pytest.fixture(autouse=True)
def _sign_with_certificate(fake: FakePayProcess) -> Iterator[None]:
    fake.control("set", sign_with="certificate")
    yield
    fake.control("set", sign_with="public_key")


def write_config(tmp_path: Path, fake: FakePayProcess, **pay: Any) -> Path:
    """A config whose [pay] is the fake's, in certificate mode only unless ``pay`` says."""
    table = {k: v for k, v in fake.table.items()
             if k not in ("wechatpay_public_key_file", "wechatpay_public_key_id")}
    table.update(pay)
    packages = table.pop("packages")
    dump = json.dumps
    text = (f'[wechat]\ntoken = "{TOKEN}"\napp_id = {dump(table["app_id"])}\n'
            f'[reader]\nsecret = "test-reader-secret-0123"\n'
            f'[database]\nurl = {dump("sqlite:///" + str(tmp_path / "nb.db"))}\n'
            "[pay]\n" + "".join(f"{k} = {dump(v)}\n" for k, v in table.items()))
    for package in packages:
        text += "[[pay.packages]]\n" + "".join(f"{k} = {dump(v)}\n" for k, v in package.items())
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def certificates(config: Path, *args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(
        cli_app, ["pay", "certificates", *args, "--config", str(config)])


def empty_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    directory.mkdir()
    return directory


def fake_serial(fake: FakePayProcess) -> str:
    saved = Path(fake.table["platform_certificates_dir"])
    (path,) = saved.glob("*.pem")
    return path.stem


def test_first_download_saves_the_certificate_and_it_then_verifies_by_serial(
        tmp_path: Path, fake: FakePayProcess) -> None:
    certs = empty_dir(tmp_path)
    config = write_config(tmp_path, fake, platform_certificates_dir=str(certs))
    done = certificates(config)
    assert done.exit_code == 0, done.output
    serial = fake_serial(fake)
    assert "FIRST USE" in done.stdout and "trust on first use" in done.stdout
    assert f"added {serial}" in done.stdout and "1 added, 0 kept, 0 expired" in done.stdout
    assert [p.name for p in certs.iterdir()] == [f"{serial}.pem"]
    assert list(load_certificates(certs)) == [serial]
    # The bot now starts on that directory alone, and an answer signed under the serial
    # verifies: WeChat's (signed) "no such order" arrives as a verified refusal.
    pay = load_settings(config).pay
    assert pay is not None
    with (PayClient.from_settings(pay, sleep=lambda s: None) as client,
          pytest.raises(PayApiError) as refused):
        client.query_order("NOSUCHORDER0001")
    assert refused.value.code == "ORDER_NOT_EXIST" and refused.value.verified


def test_with_the_public_key_the_answer_is_verified_with_it(
        tmp_path: Path, fake: FakePayProcess) -> None:
    fake.control("set", sign_with="public_key")
    certs = empty_dir(tmp_path)
    config = write_config(tmp_path, fake, platform_certificates_dir=str(certs),
                          wechatpay_public_key_file=fake.table["wechatpay_public_key_file"],
                          wechatpay_public_key_id=fake.table["wechatpay_public_key_id"])
    done = certificates(config, "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["first_use"] is False
    assert report["trusted"] == [fake.table["wechatpay_public_key_id"]]
    assert [c["outcome"] for c in report["certificates"]] == ["added"]


def test_a_forged_signature_writes_nothing(tmp_path: Path, fake: FakePayProcess) -> None:
    certs = empty_dir(tmp_path)
    config = write_config(tmp_path, fake, platform_certificates_dir=str(certs))
    # Signed with a stranger's key under the real serial; the client retries nothing here.
    fake.control("forge_next", how="key", path="/v3/certificates")
    done = certificates(config)
    assert done.exit_code == 1, done.output
    assert "signature does not match" in done.output and "nothing written" in done.output
    assert list(certs.iterdir()) == []


def test_a_wrong_apiv3_key_writes_nothing(tmp_path: Path, fake: FakePayProcess) -> None:
    certs = empty_dir(tmp_path)
    config = write_config(tmp_path, fake, platform_certificates_dir=str(certs),
                          apiv3_key="0123456789abcdef0123456789abcdef")
    done = certificates(config)
    assert done.exit_code == 1, done.output
    assert "does not decrypt" in done.output and "nothing written" in done.output
    assert list(certs.iterdir()) == []


def test_a_rerun_keeps_the_saved_file_and_trusts_it(tmp_path: Path,
                                                    fake: FakePayProcess) -> None:
    certs = empty_dir(tmp_path)
    config = write_config(tmp_path, fake, platform_certificates_dir=str(certs))
    assert certificates(config).exit_code == 0
    (saved,) = certs.iterdir()
    before = (saved.read_bytes(), saved.stat().st_mtime_ns, saved.stat().st_ino)
    again = certificates(config)
    assert again.exit_code == 0, again.output
    serial = fake_serial(fake)
    assert "FIRST USE" not in again.stdout
    assert f"verified with a key already held ({serial})" in again.stdout
    assert f"kept {serial}" in again.stdout and "0 added, 1 kept, 0 expired" in again.stdout
    assert list(certs.iterdir()) == [saved]
    assert (saved.read_bytes(), saved.stat().st_mtime_ns, saved.stat().st_ino) == before


def test_without_a_directory_or_pay_it_exits_2(tmp_path: Path,
                                               fake: FakePayProcess) -> None:
    config = write_config(tmp_path, fake, platform_certificates_dir=str(empty_dir(tmp_path)))
    missing = certificates(config, "--dir", str(tmp_path / "nowhere"))
    assert missing.exit_code == 2 and "is not a directory" in missing.output
    bare = tmp_path / "bare.toml"
    bare.write_text(f'[wechat]\ntoken = "{TOKEN}"\n[reader]\nsecret = "test-reader-secret-0123"\n'
                    f'[database]\nurl = "sqlite:///{tmp_path}/b.db"\n', encoding="utf-8")
    off = certificates(bare)
    assert off.exit_code == 2 and "payments are off" in off.output


def test_a_certificate_under_another_serial_no_is_refused() -> None:
    ident = identity()
    pem = ident.certificate.public_bytes(Encoding.PEM)
    sealed = encrypt_resource(pem, ident.apiv3_key, associated_data="certificate",
                              original_type="certificate")
    body = json.dumps({"data": [{"serial_no": "ABCDEF0123", "encrypt_certificate": sealed}]})
    with pytest.raises(CertificateRefused, match="is not the serial_no"):
        decrypt_certificates(body.encode(), ident.apiv3_key)
    good = json.dumps({"data": [{"serial_no": ident.certificate_serial.lower(),
                                 "encrypt_certificate": sealed}]})
    assert [c.serial for c in decrypt_certificates(good.encode(), ident.apiv3_key)] == [
        ident.certificate_serial]


def test_a_new_certificate_vouching_for_itself_is_not_trusted_once_a_key_is_held(
        tmp_path: Path, fake: FakePayProcess) -> None:
    """Trust on first use is for the first download only: a WeChat look-alike serving (and
    signing with) a certificate of its own is refused when we already hold a certificate."""
    ident = identity()
    key = _rsa_key()
    impostor = dataclasses.replace(ident, certificate_key=key,
                                   certificate=_self_signed(key, "Not Tenpay"))
    with FakeWeChatPay(impostor, sign_with="certificate") as other:
        table = ident.pay_table(tmp_path / "keys", other.base_url, mode="certificate")
        certs = Path(table["platform_certificates_dir"])
        before = sorted(p.name for p in certs.iterdir())
        config = write_config(tmp_path, fake, **table)
        done = certificates(config)
    assert done.exit_code == 1, done.output
    assert "unknown Wechatpay-Serial" in done.output and "nothing written" in done.output
    assert sorted(p.name for p in certs.iterdir()) == before == [f"{ident.certificate_serial}.pem"]
