#include "distval/curve_keys.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

namespace distval {
namespace {

std::string Trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

// "name = \"value\"" lines (and a bare key, stored under "").
StatusOr<std::map<std::string, std::string>> ParseKeyFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return NotFoundError("cannot open key file " + path + ": " + std::strerror(errno));
  std::map<std::string, std::string> fields;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    line = Trim(line);
    if (line.empty() || line[0] == '#') continue;
    std::string name, value;
    const size_t eq = line.find('=');
    if (eq == std::string::npos) {
      value = line;
    } else {
      name = Trim(line.substr(0, eq));
      value = Trim(line.substr(eq + 1));
    }
    if (value.size() >= 2 && value.front() == '"' && value.back() == '"')
      value = value.substr(1, value.size() - 2);
    if (!IsCurveKeyZ85(value))
      return InvalidArgumentError("key file " + path + " line " + std::to_string(number) +
                                  ": not a 40-character Z85 CURVE key");
    fields[name] = value;
  }
  return fields;
}

Status WriteFile(const std::string& path, const std::string& text, mode_t mode) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) {
    if (errno == EEXIST) return AlreadyExistsError("key file " + path + " already exists");
    return InternalError("cannot create key file " + path + ": " + std::strerror(errno));
  }
  // The umask may have narrowed the mode; the secret's is set exactly.
  bool ok = ::fchmod(fd, mode) == 0;
  size_t done = 0;
  while (ok && done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    ok = n > 0;
    if (ok) done += static_cast<size_t>(n);
  }
  ok = ok && ::fsync(fd) == 0;
  const int saved = errno;
  ok = (::close(fd) == 0) && ok;
  if (!ok) {
    ::unlink(path.c_str());
    return InternalError("cannot write key file " + path + ": " + std::strerror(saved));
  }
  return OkStatus();
}

}  // namespace

bool IsCurveKeyZ85(const std::string& key) {
  if (key.size() != kCurveKeyZ85Length) return false;
  uint8_t decoded[32];
  return zmq_z85_decode(decoded, key.c_str()) != nullptr;
}

StatusOr<CurveKeyPair> GenerateCurveKeyPair() {
  char pub[41] = {}, sec[41] = {};
  if (zmq_curve_keypair(pub, sec) != 0) {
    if (errno == ENOTSUP) return UnimplementedError("libzmq was built without CURVE support");
    return InternalError(std::string("zmq_curve_keypair: ") + zmq_strerror(errno));
  }
  return CurveKeyPair{pub, sec};
}

Status WriteCurveKeyFiles(const std::string& base, const CurveKeyPair& pair) {
  if (!IsCurveKeyZ85(pair.public_key) || !IsCurveKeyZ85(pair.secret_key))
    return InvalidArgumentError("WriteCurveKeyFiles: the key pair is not 40-character Z85");
  const std::string secret_path = base + ".key_secret", public_path = base + ".key";
  if (std::filesystem::exists(public_path))
    return AlreadyExistsError("key file " + public_path + " already exists");
  DV_RETURN_IF_ERROR(WriteFile(secret_path,
                               "# distval CURVE key pair (ZeroMQ Z85). Keep this file secret.\n"
                               "public-key = \"" +
                                   pair.public_key + "\"\nsecret-key = \"" + pair.secret_key +
                                   "\"\n",
                               0600));
  Status s = WriteFile(
      public_path,
      "# distval CURVE public key (ZeroMQ Z85).\npublic-key = \"" + pair.public_key + "\"\n", 0644);
  if (!s.ok()) ::unlink(secret_path.c_str());
  return s;
}

StatusOr<CurveKeyPair> ReadCurveSecretKeyFile(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    return NotFoundError("cannot open key file " + path + ": " + std::strerror(errno));
  if ((st.st_mode & 077) != 0) {
    std::ostringstream mode;
    mode << std::oct << (st.st_mode & 0777);
    return PermissionDeniedError("secret key file " + path + " has mode 0" + mode.str() +
                                 ": group and others must not have access (chmod 600)");
  }
  DV_ASSIGN_OR_RETURN(auto fields, ParseKeyFile(path));
  auto sec = fields.find("secret-key");
  if (sec == fields.end())
    return InvalidArgumentError("key file " + path + " has no secret-key line");
  char derived[41] = {};
  if (zmq_curve_public(derived, sec->second.c_str()) != 0)
    return InvalidArgumentError("key file " + path + ": secret-key is not a valid CURVE key");
  auto pub = fields.find("public-key");
  if (pub != fields.end() && pub->second != derived)
    return InvalidArgumentError("key file " + path +
                                ": public-key does not belong to its secret-key");
  return CurveKeyPair{derived, sec->second};
}

StatusOr<std::string> ReadCurvePublicKeyFile(const std::string& path) {
  DV_ASSIGN_OR_RETURN(auto fields, ParseKeyFile(path));
  if (auto it = fields.find("public-key"); it != fields.end()) return it->second;
  if (auto it = fields.find(""); it != fields.end() && fields.size() == 1) return it->second;
  return InvalidArgumentError("key file " + path + " has no public-key line");
}

StatusOr<std::vector<std::string>> ReadAuthorizedKeysDir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::directory_iterator it(dir, ec);
  if (ec)
    return NotFoundError("cannot read authorized keys directory " + dir + ": " + ec.message());
  std::vector<std::string> keys;
  for (const auto& entry : it) {
    const std::string name = entry.path().filename().string();
    if (name.empty() || name[0] == '.' || !entry.is_regular_file(ec)) continue;
    DV_ASSIGN_OR_RETURN(std::string key, ReadCurvePublicKeyFile(entry.path().string()));
    keys.push_back(std::move(key));
  }
  if (keys.empty())
    return InvalidArgumentError("authorized keys directory " + dir + " holds no public key file");
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  return keys;
}

StatusOr<std::optional<CurveClientKeys>> ReadCurveClientKeys(const std::string& secret_path,
                                                             const std::string& server_key_path) {
  if (secret_path.empty() && server_key_path.empty()) return std::optional<CurveClientKeys>();
  if (secret_path.empty() || server_key_path.empty())
    return InvalidArgumentError("--curve-secret and --server-key go together");
  CurveClientKeys keys;
  auto own = ReadCurveSecretKeyFile(secret_path);
  if (!own.ok()) return own.status().WithContext("--curve-secret");
  keys.own = std::move(*own);
  auto server = ReadCurvePublicKeyFile(server_key_path);
  if (!server.ok()) return server.status().WithContext("--server-key");
  keys.server_public_key = std::move(*server);
  return std::optional<CurveClientKeys>(std::move(keys));
}

}  // namespace distval
