//! `AwsKms` against a real KMS API: moto's server on 127.0.0.1, started
//! here (`pip install 'moto[server]'`; scripts/ci/setup.sh installs it).
//! Without moto the test fails, saying so: it is never skipped.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_kms::{AwsKms, AwsKmsConfig, KmsError, envelope};

struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moto() -> Moto {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // `python3 -m moto.server` is `moto_server` without relying on where
    // pip put its scripts.
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("the AWS KMS tests need python3 with moto: {error}"));
    let moto = Moto {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "moto's server did not start; is it installed? pip install 'moto[server]'"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    moto
}

fn config(moto: &Moto, key_id: &str, retired: &[&str]) -> AwsKmsConfig {
    AwsKmsConfig {
        region: "us-east-1".to_owned(),
        key_id: key_id.to_owned(),
        retired_key_ids: retired.iter().map(|key| (*key).to_owned()).collect(),
        endpoint_url: Some(moto.url.clone()),
        access_key_id: Some("testing".to_owned()),
        secret_access_key: Some("testing".to_owned()),
        session_token: None,
    }
}

async fn create_key(kms: &AwsKms) -> String {
    kms.client()
        .create_key()
        .send()
        .await
        .unwrap()
        .key_metadata()
        .unwrap()
        .key_id()
        .to_owned()
}

#[tokio::test]
async fn envelopes_under_aws_kms_open_across_a_key_rotation_and_only_as_sealed() {
    let moto = start_moto();
    let setup = AwsKms::new(&config(&moto, "unused", &[])).unwrap();
    let first = create_key(&setup).await;
    let kms = AwsKms::new(&config(&moto, &first, &[])).unwrap();

    let old = envelope::seal(&kms, "keel/pki/node-ca.key", b"ca key")
        .await
        .unwrap();
    assert!(envelope::master_key_id(&old).unwrap().contains(&first));
    assert_eq!(
        envelope::open(&kms, "keel/pki/node-ca.key", &old)
            .await
            .unwrap()
            .as_slice(),
        b"ca key"
    );
    assert!(matches!(
        envelope::open(&kms, "keel/pki/signing.key", &old).await,
        Err(KmsError::Decrypt)
    ));

    // Rotation: a new master key wraps new data keys; the old envelope
    // still opens through the key it names, once that key is listed as
    // retired — and not otherwise.
    let second = create_key(&setup).await;
    let forgetful = AwsKms::new(&config(&moto, &second, &[])).unwrap();
    assert!(matches!(
        envelope::open(&forgetful, "keel/pki/node-ca.key", &old).await,
        Err(KmsError::ForeignMasterKey(_))
    ));
    let rotated = AwsKms::new(&config(&moto, &second, &[&first])).unwrap();
    let new = envelope::seal(&rotated, "keel/pki/node-ca.key", b"new ca key")
        .await
        .unwrap();
    assert!(envelope::master_key_id(&new).unwrap().contains(&second));
    assert_eq!(
        envelope::open(&rotated, "keel/pki/node-ca.key", &old)
            .await
            .unwrap()
            .as_slice(),
        b"ca key"
    );

    // The KMS really decides: a wrapped key altered in the envelope is
    // refused by it, and a key it never made is unknown to it.
    let id_len = usize::from(old[4]);
    let blob_start = 4 + 1 + id_len + 2;
    let mut altered = old.clone();
    altered[blob_start + 10] ^= 0x01;
    assert!(
        envelope::open(&rotated, "keel/pki/node-ca.key", &altered)
            .await
            .is_err()
    );
    // A key AWS made but that is not configured here is never asked.
    let stranger = create_key(&setup).await;
    let foreign = envelope::seal(
        &AwsKms::new(&config(&moto, &stranger, &[])).unwrap(),
        "keel/pki/node-ca.key",
        b"forged ca key",
    )
    .await
    .unwrap();
    assert!(matches!(
        envelope::open(&rotated, "keel/pki/node-ca.key", &foreign).await,
        Err(KmsError::ForeignMasterKey(_))
    ));
}
