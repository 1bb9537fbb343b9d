// distval-keygen: writes a CURVE key pair for distval-ps / distval-worker /
// distval-ctl (NAME.key_secret, mode 0600, and NAME.key, the public key).
#include <CLI/CLI.hpp>
#include <iostream>
#include <string>

#include "distval/curve_keys.h"

int main(int argc, char** argv) {
  CLI::App app{
      "distval-keygen: writes a ZeroMQ CURVE key pair as NAME.key_secret (public and secret "
      "key, mode 0600: give it to the one process that owns it) and NAME.key (public key: "
      "copy it into the servers' --authorized-keys directory, or give a server's to its "
      "clients as --server-key)"};
  std::string name;
  app.add_option("name", name, "path and name of the pair, without extension")->required();
  CLI11_PARSE(app, argc, argv);

  auto pair = distval::GenerateCurveKeyPair();
  if (!pair.ok()) {
    std::cerr << "distval-keygen: " << pair.status().message() << "\n";
    return 1;
  }
  distval::Status s = distval::WriteCurveKeyFiles(name, *pair);
  if (!s.ok()) {
    std::cerr << "distval-keygen: " << s.message() << "\n";
    return 1;
  }
  std::cout << "wrote " << name << ".key_secret and " << name << ".key (public key "
            << pair->public_key << ")\n";
  return 0;
}
