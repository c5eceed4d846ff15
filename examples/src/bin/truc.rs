//! The seed's `truc`: prints its working directory and argc on stdout, each
//! argument on stderr, then opens `titi` in the working directory and says
//! what happened. Useful to see what dsmexec hands to every process.

use std::io::Read;

fn main() {
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|e| format!("<unknown: {e}>"));
    let args: Vec<String> = std::env::args().collect();
    println!("cwd: {cwd}");
    println!("argc: {}", args.len());
    for (i, arg) in args.iter().enumerate() {
        eprintln!("argv[{i}]: {arg}");
    }
    match std::fs::File::open("titi") {
        Ok(mut f) => {
            let mut text = String::new();
            match f.read_to_string(&mut text) {
                Ok(n) => println!("titi: opened, {n} bytes: {}", text.trim_end()),
                Err(e) => println!("titi: opened, unreadable: {e}"),
            }
        }
        Err(e) => println!("titi: cannot open: {e}"),
    }
}
