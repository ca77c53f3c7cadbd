//! The server over real loopback sockets: keep-alive, a panicking handler answered with 500
//! while the server carries on, the Host check, and the connection limit.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serve::client::Client;
use serve::server::MAX_CONNECTIONS;
use serve::{Response, Server};

fn start() -> String {
    let server = Server::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        server.run(Arc::new(|req| {
            if req.path == "/panic" {
                panic!("handler bug");
            }
            Response::json(200, format!("{{\"path\": \"{}\"}}", req.path))
        }))
    });
    addr
}

#[test]
fn keep_alive_and_a_panicking_handler_does_not_stop_the_server() {
    let addr = start();
    let mut c = Client::new(&addr, Duration::from_secs(10));
    for i in 0..5 {
        let r = c.get(&format!("/x{i}")).unwrap();
        assert_eq!(
            (r.status, r.body),
            (200, format!("{{\"path\": \"/x{i}\"}}"))
        );
    }
    let r = c.get("/panic").unwrap();
    assert_eq!(r.status, 500);
    assert!(r.body.contains("handler bug"), "{}", r.body);
    assert_eq!(c.get("/after").unwrap().status, 200);
}

#[test]
fn only_requests_addressed_to_localhost_are_answered() {
    let addr = start();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: attacker.example:80\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 403 "), "{out}");
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 403 "), "no Host at all: {out}");
}

#[test]
fn connections_past_the_limit_get_503_and_the_server_recovers() {
    let addr = start();
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(TcpStream::connect(&addr).unwrap());
    }
    // Connections are counted when accepted: wait until the next one is refused.
    let t0 = Instant::now();
    loop {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        if head.starts_with("HTTP/1.1 503 ") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "never refused: {head}"
        );
        idle.push(s);
    }
    drop(idle);
    let mut c = Client::new(&addr, Duration::from_secs(10));
    let t0 = Instant::now();
    while c.get("/again").map(|r| r.status).ok() != Some(200) {
        assert!(t0.elapsed() < Duration::from_secs(10), "did not recover");
        std::thread::sleep(Duration::from_millis(20));
    }
}
