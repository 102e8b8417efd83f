//! The S3 options the README names, seen on the wire through the proxy in
//! front of the real server: `--region` overrides the region requests are
//! signed for; without it the region comes from the AWS configuration
//! (`AWS_REGION`), else it is us-east-1.

mod common;

use std::collections::BTreeSet;
use std::fs;

use common::proxy::Proxy;
use common::s3::TestS3;

/// The regions of the requests the proxy saw (SigV4 credential scopes).
fn regions(proxy: &Proxy) -> BTreeSet<String> {
    proxy
        .answered()
        .iter()
        .map(|a| a.request.signed_region().unwrap_or("unsigned").to_string())
        .collect()
}

#[test]
fn requests_are_signed_for_the_region_given_else_the_configured_one_else_us_east_1() {
    let test = "requests_are_signed_for_the_region_given_else_the_configured_one_else_us_east_1";
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    let mut sb = s3.sandbox();
    fs::create_dir(sb.work().join("d")).unwrap();
    fs::write(sb.work().join("d/f"), b"region").unwrap();
    // No region from the environment or instance metadata; HOME has no ~/.aws.
    sb.unset = vec!["AWS_REGION".into(), "AWS_DEFAULT_REGION".into()];
    sb.env
        .push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
    let cases = [
        (Some("eu-west-3"), Some("ap-south-1"), "eu-west-3"),
        (None, Some("ap-south-1"), "ap-south-1"),
        (None, None, "us-east-1"),
    ];
    for (region_flag, env_region, expected) in cases {
        let proxy = Proxy::start(&s3.endpoint);
        let mut env = sb.env.clone();
        if let Some(r) = env_region {
            env.push(("AWS_REGION".into(), r.into()));
        }
        let before = std::mem::replace(&mut sb.env, env);
        let mut args = vec!["--endpoint-url".to_string(), proxy.url()];
        if let Some(r) = region_flag {
            args.extend(["--region".to_string(), r.to_string()]);
        }
        args.extend(["save", "-q", "--key", expected, "d"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sb.ok(&args);
        sb.env = before;
        assert_eq!(
            regions(&proxy),
            BTreeSet::from([expected.to_string()]),
            "--region {region_flag:?}, AWS_REGION {env_region:?}"
        );
    }
}
