//! Client certificates as each source presents them: Envoy's peer certificate (PEM, URL-encoded
//! PEM, DER), `x-forwarded-client-cert`, `X-ARR-ClientCert`; and certificate files (PEM/DER).
#![no_main]
use gateguard_core::client_cert::{describe_der, pem_or_der_to_der, PresentedCertificates};
use gateguard_core::CompiledPolicy;
use gateguard_fuzz::{policy, NOW};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static POLICY: CompiledPolicy = policy();
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let presented = match which % 4 {
        0 => PresentedCertificates {
            connection: Some(rest),
            ..Default::default()
        },
        1 => PresentedCertificates {
            xfcc: Some(&text),
            ..Default::default()
        },
        2 => PresentedCertificates {
            arr: Some(&text),
            ..Default::default()
        },
        _ => {
            if let Ok(der) = pem_or_der_to_der(rest) {
                assert!(describe_der(&der).is_ok());
            }
            let _ = describe_der(rest);
            return;
        }
    };
    POLICY.with(|p| {
        for api in &p.apis {
            if let Some(cert) = &api.client_certificate {
                // The one listed thumbprint is no certificate's: nothing is accepted.
                assert!(cert.check(&presented, NOW).is_err());
            }
        }
    });
});
