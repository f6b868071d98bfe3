// CoreDNS for e2e-real, with only the plugins a cluster's DNS needs (the kubernetes plugin for
// Services, headless Services and pod hostnames; cache; health and ready; errors and log), built
// the way CoreDNS documents for compile-time plugin selection: its own main, its own directive
// order. The full build pulls every cloud SDK it has a plugin for.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The order plugins see a query in, as in CoreDNS's plugin.cfg (a subset of it).
var directives = []string{"bind", "ready", "health", "errors", "log", "cache", "kubernetes"}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
