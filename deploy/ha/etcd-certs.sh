#!/usr/bin/env bash
# Makes the TLS files of a three-member (or any size) etcd cluster for miren coordinators:
# a CA for etcd only, one certificate per member (serves clients and peers, and is the
# member's client certificate towards its peers), and one client certificate the
# coordinators present (`--etcd-cert`/`--etcd-key`).
#
#   etcd-certs.sh OUT_DIR NAME=IP[,IP|DNS…] [NAME=IP…]
#   etcd-certs.sh /root/etcd-pki m1=10.0.0.1 m2=10.0.0.2 m3=10.0.0.3,etcd-3.example.com
#
# Writes OUT_DIR/ca.crt, ca.key, NAME.crt, NAME.key for each member, client.crt, client.key.
# Keys are 0600. Files that exist are kept (run it again to add a member: the CA is reused);
# nothing is half-written: each file is made under a temporary name and renamed.
# Certificates last DAYS (default 825) days; the CA ten years.
set -euo pipefail

usage() { echo "usage: $0 OUT_DIR NAME=IP[,IP|DNS...] [NAME=...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
out=$1; shift
days=${DAYS:-825}
command -v openssl >/dev/null || { echo "error: openssl is needed (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$out"
chmod 700 "$out"
umask 077

# Writes the output of "$@" to $1 through a temporary file, renamed when complete.
atomic() { local dest=$1; shift; "$@" > "$dest.tmp.$$" && mv -f "$dest.tmp.$$" "$dest"; }

if [ ! -s "$out/ca.crt" ]; then
  atomic "$out/ca.key" openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256
  atomic "$out/ca.crt" openssl req -x509 -new -key "$out/ca.key" -days 3650 -subj "/CN=miren etcd CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
fi

# issue NAME SUBJECT_ALT_NAMES EXTENDED_KEY_USAGE
issue() {
  local name=$1 san=$2 eku=$3 ext
  [ -s "$out/$name.crt" ] && { echo "kept $out/$name.crt"; return; }
  ext=$(mktemp)
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\n' "$eku" > "$ext"
  [ -n "$san" ] && printf 'subjectAltName=%s\n' "$san" >> "$ext"
  atomic "$out/$name.key" openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256
  openssl req -new -key "$out/$name.key" -subj "/CN=$name" -out "$out/$name.csr"
  atomic "$out/$name.crt" openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -days "$days" -extfile "$ext"
  rm -f "$out/$name.csr" "$ext"
  echo "wrote $out/$name.crt"
}

for member in "$@"; do
  name=${member%%=*}
  addrs=${member#*=}
  case $name in ''|*[!A-Za-z0-9_-]*|client|ca) echo "error: bad member name '$name' (letters, digits, - and _; not 'client' or 'ca')" >&2; exit 2;; esac
  if [ "$name" = "$member" ] || [ -z "$addrs" ]; then echo "error: '$member' is not NAME=IP[,IP|DNS...]" >&2; exit 2; fi
  san=""
  IFS=, read -r -a list <<< "$addrs"
  for a in "${list[@]}"; do
    if [[ $a =~ ^[0-9.]+$ || $a == *:* ]]; then san+="IP:$a,"; else san+="DNS:$a,"; fi
  done
  issue "$name" "${san%,}" "serverAuth,clientAuth"
done
issue client "" "clientAuth"
rm -f "$out/ca.srl"
echo "CA: $out/ca.crt (copy to every member and coordinator; keep ca.key offline)"
