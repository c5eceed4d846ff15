//! Tests that need an RDMA device (the rxe VM: `scripts/rdma-vm-test.sh`).
//!
//! Without a device each test prints a SKIPPED line and passes, unless
//! `DSM_TEST_REQUIRE_RDMA=1`, where it fails.

use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dsm_core::auth::JobSecret;
use dsm_core::bootstrap::{Bootstrap, PeerInfo};
use dsm_core::Transport;
use transport_rdma::{MemoryRegion, RdmaDevice, RdmaOptions, RdmaTransport};
use transport_tcp::{TcpOptions, TcpTransport};

const LIMIT: Duration = Duration::from_secs(60);
const REGION: usize = 1 << 20;

fn device_or_skip(test: &str) -> bool {
    match transport_rdma::select::active_port() {
        Ok(_) => true,
        Err(why) => {
            if std::env::var("DSM_TEST_REQUIRE_RDMA").as_deref() == Ok("1") {
                panic!("{test}: DSM_TEST_REQUIRE_RDMA=1 but no RDMA device: {why}");
            }
            println!("SKIPPED {test}: no RDMA device ({why}); run scripts/rdma-vm-test.sh");
            false
        }
    }
}

fn pattern(rank: usize, i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (rank * 101)) as u8
}

struct Rank {
    t: Arc<RdmaTransport>,
    region: Arc<MemoryRegion>,
}

fn rdma_over(boot: Bootstrap) -> Rank {
    let rank = boot.rank;
    let tcp = TcpTransport::connect(boot, &TcpOptions::default()).unwrap();
    let opts = RdmaOptions::from_env().unwrap();
    let dev = RdmaDevice::open(&opts).unwrap();
    let region = dev.alloc(REGION).unwrap();
    let fill: Vec<u8> = (0..REGION).map(|i| pattern(rank, i)).collect();
    region.write_bytes(0, &fill).unwrap();
    let t = RdmaTransport::connect(tcp, dev, vec![Arc::clone(&region)], &opts).unwrap();
    Rank { t, region }
}

fn job(size: usize) -> Vec<Rank> {
    let boots = Bootstrap::loopback_group(size).unwrap();
    let hs: Vec<_> = boots
        .into_iter()
        .map(|b| thread::spawn(move || rdma_over(b)))
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

fn shutdown_all(ranks: Vec<Rank>) {
    let hs: Vec<_> = ranks
        .into_iter()
        .map(|r| thread::spawn(move || r.t.shutdown(Duration::from_secs(20)).unwrap()))
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

#[test]
fn two_ranks_read_write_send_recv() {
    if !device_or_skip("two_ranks_read_write_send_recv") {
        return;
    }
    let ranks = job(2);
    let (a, b) = (&ranks[0], &ranks[1]);
    let remote_b = a.t.remote_regions(1)[0];
    assert_eq!(remote_b.len, REGION as u64);

    // READ 4 KiB at offset 8192 of rank 1 into rank 0's scratch buffer.
    let scratch = a.t.device().alloc(64 << 10).unwrap();
    a.t.read(1, &remote_b, 8192, &scratch, 100, 4096).unwrap();
    let got = scratch.to_vec(100, 4096).unwrap();
    let want: Vec<u8> = (8192..8192 + 4096).map(|i| pattern(1, i)).collect();
    assert_eq!(got, want, "RDMA READ data");

    // A larger READ (whole region of 1 MiB minus an offset).
    let big = a.t.device().alloc(REGION).unwrap();
    a.t.read(1, &remote_b, 1, &big, 0, REGION - 1).unwrap();
    let want: Vec<u8> = (1..REGION).map(|i| pattern(1, i)).collect();
    assert_eq!(big.to_vec(0, REGION - 1).unwrap(), want);

    // WRITE 4 KiB into rank 1's region, then tell it over SEND/RECV.
    let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    scratch.write_bytes(0, &data).unwrap();
    a.t.write(1, &remote_b, 65536, &scratch, 0, 4096).unwrap();
    a.t.send(1, b"written").unwrap();
    let m = b.t.recv_timeout(LIMIT).unwrap().expect("message");
    assert_eq!((m.from, m.payload.as_slice()), (0, &b"written"[..]));
    assert_eq!(
        b.region.to_vec(65536, 4096).unwrap(),
        data,
        "RDMA WRITE data"
    );

    // Reply with a fragmented message made of parts.
    let head = [7u8; 10];
    let page: Vec<u8> = (0..100_000).map(|i| (i % 253) as u8).collect();
    b.t.send_parts(0, &[&head, &page]).unwrap();
    let m = a.t.recv_timeout(LIMIT).unwrap().expect("reply");
    assert_eq!(m.from, 1);
    assert_eq!(&m.payload[..10], &head);
    assert_eq!(&m.payload[10..], &page[..]);

    // Self-send loops back; out-of-range is refused.
    a.t.send(0, b"me").unwrap();
    assert_eq!(a.t.recv_timeout(LIMIT).unwrap().unwrap().payload, b"me");
    assert!(a
        .t
        .read(1, &remote_b, REGION as u64, &scratch, 0, 1)
        .is_err());
    assert!(a.t.send(5, b"x").is_err());
    shutdown_all(ranks);
}

#[test]
fn many_messages_from_many_threads_arrive_whole_and_in_order() {
    if !device_or_skip("many_messages_from_many_threads_arrive_whole_and_in_order") {
        return;
    }
    const N: usize = 3;
    const THREADS: usize = 3;
    const PER_THREAD: u32 = 500;
    let ranks = job(N);
    let ts: Vec<Arc<RdmaTransport>> = ranks.iter().map(|r| Arc::clone(&r.t)).collect();
    let start = Instant::now();
    let mut senders = Vec::new();
    for t in &ts {
        for th in 0..THREADS {
            let t = Arc::clone(t);
            senders.push(thread::spawn(move || {
                for seq in 0..PER_THREAD {
                    for to in 0..N {
                        // Every 50th message is large (fragmented).
                        let len = if seq % 50 == 0 {
                            40_000
                        } else {
                            16 + (seq as usize % 64)
                        };
                        let mut msg = vec![(seq % 256) as u8; len];
                        msg[..4].copy_from_slice(&(t.rank() as u32).to_le_bytes());
                        msg[4..8].copy_from_slice(&(th as u32).to_le_bytes());
                        msg[8..12].copy_from_slice(&seq.to_le_bytes());
                        t.send(to, &msg).unwrap();
                    }
                }
            }));
        }
    }
    let receivers: Vec<_> = ts
        .iter()
        .map(|t| {
            let t = Arc::clone(t);
            thread::spawn(move || {
                let mut next = [[0u32; THREADS]; N];
                for _ in 0..(N * THREADS) as u32 * PER_THREAD {
                    let m = t.recv_timeout(LIMIT).unwrap().expect("message");
                    let p = &m.payload;
                    let from = u32::from_le_bytes(p[..4].try_into().unwrap()) as usize;
                    let th = u32::from_le_bytes(p[4..8].try_into().unwrap()) as usize;
                    let seq = u32::from_le_bytes(p[8..12].try_into().unwrap());
                    assert_eq!(from, m.from);
                    assert_eq!(seq, next[from][th], "order from rank {from} thread {th}");
                    next[from][th] += 1;
                    let len = if seq % 50 == 0 {
                        40_000
                    } else {
                        16 + (seq as usize % 64)
                    };
                    assert_eq!(p.len(), len);
                    assert!(p[12..].iter().all(|b| *b == (seq % 256) as u8));
                }
            })
        })
        .collect();
    for h in senders {
        h.join().unwrap();
    }
    for h in receivers {
        h.join().unwrap();
    }
    let total = N * N * THREADS * PER_THREAD as usize;
    println!("{total} messages among {N} ranks in {:?}", start.elapsed());
    shutdown_all(ranks);
}

/// One rank of the cross-process test (run by `cross_process_read_write_send`).
#[test]
#[ignore]
fn cross_process_child() {
    let Ok(rank) = std::env::var("DSM_RDMA_CHILD_RANK") else {
        return;
    };
    let rank: usize = rank.parse().unwrap();
    let ports: Vec<u16> = std::env::var("DSM_RDMA_CHILD_PORTS")
        .unwrap()
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    let peers: Vec<PeerInfo> = ports
        .iter()
        .map(|p| PeerInfo {
            host: "localhost".into(),
            addr: format!("127.0.0.1:{p}").parse().unwrap(),
        })
        .collect();
    let listener = TcpListener::bind(peers[rank].addr).unwrap();
    let boot = Bootstrap {
        rank,
        size: 2,
        peers,
        listener,
        secret: JobSecret::from_hex(&"ab".repeat(32)).unwrap(),
        job_id: "rdma-cross".into(),
    };
    let me = rdma_over(boot);
    if rank == 1 {
        let remote = me.t.remote_regions(0)[0];
        let buf = me.t.device().alloc(8192).unwrap();
        me.t.read(0, &remote, 4096, &buf, 0, 4096).unwrap();
        let want: Vec<u8> = (4096..8192).map(|i| pattern(0, i)).collect();
        assert_eq!(buf.to_vec(0, 4096).unwrap(), want);
        buf.write_bytes(0, &[0x5a; 4096]).unwrap();
        me.t.write(0, &remote, 0, &buf, 0, 4096).unwrap();
        me.t.send(0, b"wrote page 0").unwrap();
        let m = me.t.recv_timeout(LIMIT).unwrap().unwrap();
        assert_eq!(m.payload, b"checked");
    } else {
        let m = me.t.recv_timeout(LIMIT).unwrap().unwrap();
        assert_eq!(m.payload, b"wrote page 0");
        assert!(me
            .region
            .to_vec(0, 4096)
            .unwrap()
            .iter()
            .all(|b| *b == 0x5a));
        me.t.send(1, b"checked").unwrap();
    }
    me.t.shutdown(Duration::from_secs(20)).unwrap();
    println!("cross-process rank {rank}: OK");
}

#[test]
fn cross_process_read_write_send() {
    if !device_or_skip("cross_process_read_write_send") {
        return;
    }
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let ports = format!("{},{}", ports[0], ports[1]);
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(&exe)
                .args(["--exact", "cross_process_child", "--ignored", "--nocapture"])
                .env("DSM_RDMA_CHILD_RANK", rank.to_string())
                .env("DSM_RDMA_CHILD_PORTS", &ports)
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, mut c) in children.into_iter().enumerate() {
        let status = c.wait().unwrap();
        assert!(status.success(), "rank {rank} process: {status}");
    }
}
