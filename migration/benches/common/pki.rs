//! A throwaway PKI for the TLS benches: a CA and 127.0.0.1 server and client certificates,
//! written as a `tls_dir`.

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// A fresh `tls_dir` in the temp dir (the caller removes it).
pub fn pki() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-tls-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().expect("key");
    let ca = p.self_signed(&ca_key).expect("ca");
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).expect("write");
    for (side, eku) in [
        ("server", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("leaf");
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &ca, &ca_key).expect("sign");
        std::fs::write(dir.join(format!("{side}-cert.pem")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{side}-key.pem")), key.serialize_pem()).expect("write");
    }
    dir
}
