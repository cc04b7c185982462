//! Throwaway PKIs for the TLS tests: a CA, a receiver certificate for given names and a sender
//! certificate, written as a `tls_dir` the way QEMU and Cloud Hypervisor lay it out.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

pub struct Ca {
    pub cert: Certificate,
    pub key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("ca key");
        let cert = p.self_signed(&key).expect("ca cert");
        Ca { cert, key }
    }

    /// (certificate PEM, key PEM) for `names` (IP addresses become IP SANs).
    pub fn leaf(&self, names: &[&str], client: bool) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names).expect("leaf params");
        p.distinguished_name.push(
            DnType::CommonName,
            if client {
                "tern source"
            } else {
                "tern destination"
            },
        );
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

/// A fresh empty directory. Test processes cannot clean up after themselves at exit, so the
/// first call of each removes the directories of test processes that are gone.
pub fn temp_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(remove_dead_processes_dirs);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("tern-tls-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

/// Removes `tern-tls-test-<pid>-<n>` directories whose process no longer exists.
fn remove_dead_processes_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("tern-tls-test-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

pub fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write pem");
}

/// A receiver's tls_dir: `ca` is trusted for clients, the server certificate comes from
/// `signer` and names `names`.
pub fn server_dir(ca: &Ca, signer: &Ca, names: &[&str]) -> PathBuf {
    let d = temp_dir();
    write(&d, "ca-cert.pem", &ca.cert.pem());
    let (c, k) = signer.leaf(names, false);
    write(&d, "server-cert.pem", &c);
    write(&d, "server-key.pem", &k);
    d
}

/// A sender's tls_dir: `ca` is trusted for the receiver, the client certificate comes from
/// `signer`.
pub fn client_dir(ca: &Ca, signer: &Ca) -> PathBuf {
    let d = temp_dir();
    write(&d, "ca-cert.pem", &ca.cert.pem());
    let (c, k) = signer.leaf(&["tern-source"], true);
    write(&d, "client-cert.pem", &c);
    write(&d, "client-key.pem", &k);
    d
}

/// One directory holding both sides' files (what an operator copies to both hosts).
pub fn both_dir(ca: &Ca, names: &[&str]) -> PathBuf {
    let d = server_dir(ca, ca, names);
    let (c, k) = ca.leaf(&["tern-source"], true);
    write(&d, "client-cert.pem", &c);
    write(&d, "client-key.pem", &k);
    d
}
