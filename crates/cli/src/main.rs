//! The `scaletrain` binary.
fn main() {
    println!("scaletrain");
}
