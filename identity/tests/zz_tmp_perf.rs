use std::time::Instant;
use identity::*;
#[test]
fn perf() {
    let key = SigningKeyPair::generate().unwrap();
    let minter = Minter::new(&key).unwrap();
    let s = Subject::new("o","a","s").unwrap();
    let c = WorkloadClaims::new("https://i", "c", &s, &[], None, 1000, "j".into()).unwrap();
    let tok = minter.mint(&c).unwrap();
    let v = Verifier::new(KeySet::from_keys([key.public_key().clone()]).unwrap(), ["https://i"], ["miren"]);
    let jwk = key.public_key().to_jwk();
    use base64::Engine;
    let nb = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jwk.n.unwrap()).unwrap();
    let eb = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jwk.e.unwrap()).unwrap();
    let p = aws_lc_rs::signature::RsaPublicKeyComponents{n:&nb[..], e:&eb[..]}.to_parsed_public_key(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256).unwrap();
    let (input, sig) = tok.rsplit_once('.').unwrap();
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).unwrap();
    let n = 20000;
    for round in 0..3 {
        let t = Instant::now();
        for _ in 0..n { v.verify(&tok, 1000).unwrap(); }
        let a = n as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..n { p.verify_sig(input.as_bytes(), &sig).unwrap(); }
        let b = n as f64 / t.elapsed().as_secs_f64();
        println!("round {round}: verify/s {a:.0} raw/s {b:.0} ratio {:.2}", a / b);
    }
}
