// kube-router's NetworkPolicy firewall alone, for the local node (operator/shadowgate_dev/localenv/node.py):
// the same wiring as kube-router's own `--run-firewall --run-router=false --run-service-proxy=false`
// (pkg/cmd/kube-router.go, Run), built from its packages without the rest. The full binary compiles gobgp,
// the AWS SDK, Docker's client and IPVS for nothing the node runs: 640 packages against 304, minutes of a
// cold build on 2 cores. Its flags are kube-router's; those of the controllers not built here do nothing.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/cloudnativelabs/kube-router/v2/pkg/controllers/netpol"
	"github.com/cloudnativelabs/kube-router/v2/pkg/healthcheck"
	"github.com/cloudnativelabs/kube-router/v2/pkg/options"
	"github.com/cloudnativelabs/kube-router/v2/pkg/version"
	"github.com/spf13/pflag"
	v1core "k8s.io/api/core/v1"
	networking "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "%s\n", err)
		os.Exit(1)
	}
}

func run() error {
	klog.InitFlags(nil)
	config := options.NewKubeRouterConfig()
	config.AddFlags(pflag.CommandLine)
	pflag.Parse()
	if err := flag.Set("logtostderr", "true"); err != nil {
		return err
	}
	if err := flag.Set("v", config.VLevel); err != nil {
		return err
	}
	if config.Version {
		version.PrintVersion(false)
		return nil
	}
	// Only the firewall runs here, whatever the flags say: the health check must not wait for the others.
	config.RunFirewall, config.RunRouter, config.RunServiceProxy, config.RunLoadBalancer = true, false, false, false
	version.PrintVersion(true)

	clientConfig, err := clientcmd.BuildConfigFromFlags(config.Master, config.Kubeconfig)
	if err != nil {
		return fmt.Errorf("failed to build configuration from CLI: %v", err)
	}
	client, err := kubernetes.NewForConfig(clientConfig)
	if err != nil {
		return fmt.Errorf("failed to create Kubernetes client: %v", err)
	}

	var wg sync.WaitGroup
	var ipsetMutex sync.Mutex
	healthChan := make(chan *healthcheck.ControllerHeartbeat, 10)
	stopCh := make(chan struct{})
	hc, err := healthcheck.NewHealthController(config)
	if err != nil {
		return fmt.Errorf("failed to create health controller: %v", err)
	}
	wg.Add(1)
	go hc.RunServer(stopCh, &wg)

	// The three informers the controller reads, made directly: client-go's informer factory would compile
	// an informer and a lister for every API group.
	podInformer := informer(client.CoreV1().RESTClient(), "pods", &v1core.Pod{})
	nsInformer := informer(client.CoreV1().RESTClient(), "namespaces", &v1core.Namespace{})
	npInformer := informer(client.NetworkingV1().RESTClient(), "networkpolicies", &networking.NetworkPolicy{})
	for _, started := range []cache.SharedIndexInformer{podInformer, nsInformer, npInformer} {
		go started.Run(stopCh)
	}
	if !cache.WaitForCacheSync(stopCh, podInformer.HasSynced, nsInformer.HasSynced, npInformer.HasSynced) {
		return fmt.Errorf("failed to synchronize the informers' caches")
	}

	hc.SetAlive()
	wg.Add(1)
	go hc.RunCheck(healthChan, stopCh, &wg)

	iptablesCmdHandlers, ipSetHandlers, err := netpol.NewIPTablesHandlers(config)
	if err != nil {
		return fmt.Errorf("failed to create iptables handlers: %v", err)
	}
	npc, err := netpol.NewNetworkPolicyController(client, config, podInformer, npInformer, nsInformer,
		&ipsetMutex, iptablesCmdHandlers, ipSetHandlers)
	if err != nil {
		return fmt.Errorf("failed to create network policy controller: %v", err)
	}
	if _, err = podInformer.AddEventHandler(npc.PodEventHandler); err != nil {
		return err
	}
	if _, err = nsInformer.AddEventHandler(npc.NamespaceEventHandler); err != nil {
		return err
	}
	if _, err = npInformer.AddEventHandler(npc.NetworkPolicyEventHandler); err != nil {
		return err
	}
	wg.Add(1)
	go npc.Run(healthChan, stopCh, &wg)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	<-signals
	klog.Info("Shutting down the network policy controller")
	close(stopCh)
	wg.Wait()
	return nil
}

func informer(client rest.Interface, resource string, object runtime.Object) cache.SharedIndexInformer {
	watch := cache.NewListWatchFromClient(client, resource, v1core.NamespaceAll, fields.Everything())
	return cache.NewSharedIndexInformer(watch, object, 0, cache.Indexers{})
}
