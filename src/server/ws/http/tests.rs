use super::*;

fn upgrade_req(extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:7222\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

fn routed(req: &str) -> Result<Option<(Route<'static>, usize)>, Refusal> {
    let assets: &'static Assets = Box::leak(Box::new(Assets::placeholder()));
    route(req.as_bytes(), &OriginPolicy::default(), assets)
}

#[test]
fn a_valid_upgrade_is_accepted_with_the_rfc_accept_key() {
    let req = upgrade_req("Sec-WebSocket-Protocol: chat, clawterm\r\n");
    let mut bytes = req.clone().into_bytes();
    bytes.extend_from_slice(b"\x82\x80rest");
    let assets = Assets::placeholder();
    let (r, used) = route(&bytes, &OriginPolicy::default(), &assets)
        .unwrap()
        .unwrap();
    assert_eq!(used, req.len(), "what follows the head is the WebSocket's");
    let Route::Upgrade { key, subprotocol } = r else {
        panic!("{r:?}")
    };
    assert!(subprotocol);
    let resp = String::from_utf8(upgrade_response(&key, subprotocol)).unwrap();
    // RFC 6455 §1.3's example.
    assert!(
        resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{resp}"
    );
    assert!(resp.starts_with("HTTP/1.1 101 "));
    assert!(resp.contains("Sec-WebSocket-Protocol: clawterm\r\n"));
}

#[test]
fn partial_heads_wait_and_oversized_ones_are_refused() {
    let req = upgrade_req("");
    for cut in [0, 10, req.len() - 1] {
        assert_eq!(routed(&req[..cut]), Ok(None), "cut at {cut}");
    }
    let huge = format!("GET /ws HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
    assert_eq!(routed(&huge).unwrap_err().status, 431);
    let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
    assert_eq!(
        routed(&format!("GET / HTTP/1.1\r\n{many}\r\n"))
            .unwrap_err()
            .status,
        431
    );
}

#[test]
fn bad_requests_get_their_status_and_reason() {
    let cases = [
        ("\x16\x03\x01garbage\r\n\r\n".to_string(), 400),
        ("GET /ws HTTP/1.0\r\n\r\n".to_string(), 505),
        ("POST /ws HTTP/1.1\r\n\r\n".to_string(), 405),
        ("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n".to_string(), 426),
        (upgrade_req("").replace("Version: 13", "Version: 8"), 426),
        (
            upgrade_req("").replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
            400,
        ),
        (upgrade_req("Origin: https://evil.example\r\n"), 403),
        (upgrade_req("Origin: null\r\n"), 403),
        ("GET /nope HTTP/1.1\r\n\r\n".to_string(), 404),
        ("DELETE / HTTP/1.1\r\n\r\n".to_string(), 405),
    ];
    for (req, status) in cases {
        let r = routed(&req).unwrap_err();
        assert_eq!(r.status, status, "{req:?}");
        let resp = String::from_utf8(refusal_response(r)).unwrap();
        assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{resp}");
        assert!(resp.ends_with(&format!("{}\n", r.reason)), "{resp}");
    }
}

#[test]
fn origins_same_host_or_listed() {
    let p = OriginPolicy::default();
    assert!(p.allows(None, Some("h:1")), "not a browser");
    assert!(p.allows(Some("http://h:1"), Some("h:1")));
    assert!(p.allows(Some("https://H:1"), Some("h:1")));
    assert!(!p.allows(Some("http://h:2"), Some("h:1")));
    assert!(!p.allows(Some("http://h:1"), None));
    let p = OriginPolicy {
        allowed: vec!["https://app.example".into()],
    };
    assert!(p.allows(Some("https://app.example"), Some("h:1")));
    assert!(!p.allows(Some("https://other.example"), Some("h:1")));
    let any = OriginPolicy {
        allowed: vec!["*".into()],
    };
    assert!(any.allows(Some("https://other.example"), Some("h:1")));
    // Upgrade with a same-origin page.
    assert!(matches!(
        routed(&upgrade_req("Origin: http://127.0.0.1:7222\r\n")),
        Ok(Some((Route::Upgrade { .. }, _)))
    ));
}

#[test]
fn the_page_is_served_with_its_type() {
    let Ok(Some((Route::Asset { asset, head }, _))) = routed("GET /?x=1 HTTP/1.1\r\n\r\n") else {
        panic!()
    };
    assert!(!head);
    let resp = asset_response(asset, false);
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(text.contains("Content-Type: text/html; charset=utf-8\r\n"));
    assert!(text.contains(&format!("Content-Length: {}\r\n", asset.body.len())));
    assert!(text.ends_with("</html>\n"));
    let Ok(Some((Route::Asset { asset, head: true }, _))) =
        routed("HEAD /index.html HTTP/1.1\r\n\r\n")
    else {
        panic!()
    };
    assert!(!String::from_utf8_lossy(&asset_response(asset, true)).contains("<html>"));
}

#[test]
fn a_web_root_is_read_whole_and_refused_without_an_index() {
    let dir = std::env::temp_dir().join(format!("ct-assets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("app.js"), "x").unwrap();
    std::fs::write(dir.join("sub/s.css"), "y").unwrap();
    std::fs::write(dir.join(".hidden"), "z").unwrap();
    assert!(Assets::load(&dir)
        .unwrap_err()
        .to_string()
        .contains("no index.html"));
    std::fs::write(dir.join("index.html"), "<p>").unwrap();
    let a = Assets::load(&dir).unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(
        a.get("/sub/s.css").unwrap().content_type,
        "text/css; charset=utf-8"
    );
    assert_eq!(a.get("/").unwrap().body, b"<p>");
    assert!(a.get("/.hidden").is_none());
    let _ = std::fs::remove_dir_all(&dir);
}
