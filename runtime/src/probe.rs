//! Liveness and readiness probes: HTTP GET, TCP connect, or a command in the container.

use std::time::Duration;

use cloudless_types::{Probe, ProbeCheck};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::driver::Driver;
use crate::spec::ReplicaId;

/// Longest HTTP response head read: the status line is all a probe needs.
const MAX_HEAD: usize = 1024;

/// Runs one check of `probe` against replica `id`; `Err` says why it failed.
pub async fn check(driver: &dyn Driver, id: &ReplicaId, probe: &Probe) -> Result<(), String> {
    let timeout = Duration::from_millis(probe.timeout_ms.into());
    let run = async {
        match &probe.check {
            ProbeCheck::Tcp { port } => {
                let addr = driver.address(id, *port).await.map_err(|e| e.to_string())?;
                TcpStream::connect(addr).await.map(|_| ()).map_err(|e| format!("tcp {addr}: {e}"))
            }
            ProbeCheck::Http { port, path } => {
                let addr = driver.address(id, *port).await.map_err(|e| e.to_string())?;
                http_get(addr, path).await
            }
            ProbeCheck::Exec { command } => {
                match driver.exec(id, command, timeout).await.map_err(|e| e.to_string())? {
                    0 => Ok(()),
                    code => Err(format!("{command:?} exited with {code}")),
                }
            }
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("http {addr}{path}: {e}");
    let mut s = TcpStream::connect(addr).await.map_err(fail)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: cloudless-probe\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.map_err(fail)?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < MAX_HEAD {
        let n = s.read(&mut buf).await.map_err(fail)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("http {addr}{path}: not an HTTP response"))?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("http {addr}{path}: status {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryDriver;
    use crate::spec::ReplicaSpec;
    use cloudless_types::{Image, Resources, WorkloadSpec};
    use tokio::net::TcpListener;

    async fn running(d: &MemoryDriver) -> ReplicaId {
        let w = WorkloadSpec::new(
            cloudless_types::WorkloadName::new("web").unwrap(),
            Image::Container("x".into()),
            Resources { cpu_millis: 1, memory_mib: 1, disk_mib: 0, gpus: 0 },
            1,
        );
        let spec = ReplicaSpec::from_workload(&w, 0);
        assert!(matches!(spec.image, Image::Container(_)));
        d.start(&spec).await.unwrap();
        spec.id
    }

    async fn serve(status: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        port
    }

    #[tokio::test]
    async fn http_tcp_and_exec_checks() {
        let d = MemoryDriver::new().unwrap();
        let id = running(&d).await;
        let ok = serve("200 OK").await;
        let bad = serve("503 Service Unavailable").await;
        let probe = |check| Probe { timeout_ms: 500, ..Probe::new(check) };
        check(&d, &id, &probe(ProbeCheck::Http { port: ok, path: "/health".into() }))
            .await
            .unwrap();
        let err = check(&d, &id, &probe(ProbeCheck::Http { port: bad, path: "/".into() })).await;
        assert!(err.unwrap_err().contains("503"));
        check(&d, &id, &probe(ProbeCheck::Tcp { port: ok })).await.unwrap();
        // A port nobody listens on.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        assert!(check(&d, &id, &probe(ProbeCheck::Tcp { port: closed })).await.is_err());
        let exec = probe(ProbeCheck::Exec { command: vec!["true".into()] });
        check(&d, &id, &exec).await.unwrap();
        d.set_exec_code(2);
        assert!(check(&d, &id, &exec).await.unwrap_err().contains("exited with 2"));
    }
}
