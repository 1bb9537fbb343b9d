// CURVE key files: ZeroMQ CURVE (Curve25519) key pairs as Z85 text.
//
// A key pair NAME is two files:
//   NAME.key_secret  (mode 0600)           NAME.key  (public, shareable)
//     public-key = "<40 Z85 chars>"          public-key = "<40 Z85 chars>"
//     secret-key = "<40 Z85 chars>"
// Lines starting with '#' and blank lines are ignored; the quotes are
// optional. A file holding only a bare 40-character Z85 key is read as a
// public key. distval-keygen writes such pairs; distval-ps reads its secret
// and a directory of authorized public keys, workers read their secret and
// the server's public key.
//
// Thread-safety: the functions are thread-safe (no shared state).
#ifndef DISTVAL_CURVE_KEYS_H_
#define DISTVAL_CURVE_KEYS_H_

#include <optional>
#include <string>
#include <vector>

#include "distval/status.h"

namespace distval {

// Length of a CURVE key in Z85 text (32 bytes).
inline constexpr size_t kCurveKeyZ85Length = 40;

struct CurveKeyPair {
  std::string public_key;  // Z85, 40 characters
  std::string secret_key;  // Z85, 40 characters
};

// A fresh key pair (zmq_curve_keypair). Unimplemented when libzmq was built
// without CURVE support.
StatusOr<CurveKeyPair> GenerateCurveKeyPair();

// True when `key` is 40 characters of valid Z85 (a 32-byte key).
bool IsCurveKeyZ85(const std::string& key);

// Writes `pair` to base + ".key_secret" (mode 0600) and base + ".key"
// (mode 0644). Refuses to replace existing files (AlreadyExists naming the
// file); other I/O errors are Internal naming the file. On error nothing
// half-written is left behind.
Status WriteCurveKeyFiles(const std::string& base, const CurveKeyPair& pair);

// Reads a secret key file. InvalidArgument naming the file when a key is
// missing or malformed, or when its public key does not belong to its
// secret key; PermissionDenied when group or others may read it (it must be
// 0600 or stricter); NotFound when it cannot be opened.
StatusOr<CurveKeyPair> ReadCurveSecretKeyFile(const std::string& path);

// Reads the public key of a public (or secret) key file. InvalidArgument
// naming the file when it holds no valid public key; NotFound when it cannot
// be opened.
StatusOr<std::string> ReadCurvePublicKeyFile(const std::string& path);

// The public keys of every regular, non-hidden file in `dir` (sorted,
// without duplicates). NotFound when `dir` is not a readable directory;
// InvalidArgument naming the file when one holds no valid public key, or
// when the directory holds no key at all.
StatusOr<std::vector<std::string>> ReadAuthorizedKeysDir(const std::string& dir);

// A CURVE client's settings from its flags (--curve-secret FILE
// --server-key FILE): its own pair and the server's public key.
struct CurveClientKeys {
  CurveKeyPair own;
  std::string server_public_key;
};
// Reads both files (errors as above, the flag's file named), or returns
// nullopt when both paths are empty. InvalidArgument when only one is given.
StatusOr<std::optional<CurveClientKeys>> ReadCurveClientKeys(const std::string& secret_path,
                                                             const std::string& server_key_path);

}  // namespace distval

#endif  // DISTVAL_CURVE_KEYS_H_
