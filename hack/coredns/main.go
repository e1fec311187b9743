// CoreDNS for the local node (shadowgate dev up --node), built from the coredns Go module with only
// the plugins its Corefile uses: the way CoreDNS documents compiling a server with a chosen plugin
// set (https://coredns.io/2017/07/25/compile-time-enabling-or-disabling-plugins/). The full plugin
// set (cloud DNS providers, etcd, ...) would triple the build for nothing the node serves.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
