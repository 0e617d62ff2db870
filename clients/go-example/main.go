// A minimal Switchboard client in Go, generated from proto/ with protoc-gen-go and
// protoc-gen-go-grpc (no M flags: the .proto files carry go_package). It publishes one message,
// reads it back through a subscription, and shows how a refusal's reason is read from its
// google.rpc.ErrorInfo detail. Build it with build.sh beside this file; docs/CLIENTS.md explains
// the pitfalls it steers around.
//
// Usage: switchboard-go-example [-addr 127.0.0.1:7400] [-channel examples.go.hello]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	switchboardv1 "example.invalid/switchboard/gen/go/switchboard/v1"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:7400", "the broker's public gRPC address (not the admin port)")
	channel := flag.String("channel", "examples.go.hello", "the channel to publish on and read back")
	flag.Parse()
	if err := run(*addr, *channel); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func run(addr, channel string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Plain text, for a broker on loopback without TLS. With TLS, pass
	// grpc.WithTransportCredentials(credentials.NewClientTLSFromCert(pool, "")) instead.
	conn, err := grpc.DialContext(ctx, addr, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		return fmt.Errorf("connect to %s: %w", addr, err)
	}
	defer conn.Close()
	broker := switchboardv1.NewBrokerClient(conn)

	info, err := broker.Info(ctx, &switchboardv1.InfoRequest{})
	if err != nil {
		return fmt.Errorf("info: %w", describe(err))
	}
	fmt.Printf("broker %s, node %d, last offset %d\n", info.Version, info.NodeId, info.LastOffset)

	ack, err := broker.Publish(ctx, &switchboardv1.PublishRequest{
		Channel: channel,
		Payload: []byte(`{"hello":"from Go"}`),
	})
	if err != nil {
		return fmt.Errorf("publish: %w", describe(err))
	}
	fmt.Printf("published at offset %d\n", ack.Offset)

	// Read it back: a subscription starting at the ack's offset. The first event is always
	// Subscribed; the message follows.
	stream, err := broker.Subscribe(ctx, &switchboardv1.SubscribeRequest{
		Pattern: channel,
		Start: &switchboardv1.StartPosition{
			Position: &switchboardv1.StartPosition_Offset{Offset: ack.Offset},
		},
	})
	if err != nil {
		return fmt.Errorf("subscribe: %w", describe(err))
	}
	for {
		event, err := stream.Recv()
		if err == io.EOF {
			return errors.New("subscription ended before the message arrived")
		}
		if err != nil {
			return fmt.Errorf("subscription: %w", describe(err))
		}
		if message := event.GetMessage(); message != nil {
			fmt.Printf("received offset %d on %s: %s\n", message.Offset, message.Channel, message.Payload)
			break
		}
	}

	// A refused publish: the reason travels as a string in ErrorInfo; ErrorReason_value maps it
	// to the generated enum (0, UNSPECIFIED, for a reason newer than this client).
	_, err = broker.Publish(ctx, &switchboardv1.PublishRequest{Channel: "not a channel"})
	reason, ok := reasonOf(err)
	if !ok {
		return fmt.Errorf("expected a refusal with a reason, got %v", err)
	}
	code := switchboardv1.ErrorReason(switchboardv1.ErrorReason_value["ERROR_REASON_"+reason])
	fmt.Printf("refused: %s, reason %s (%s)\n", status.Code(err), reason, code)
	if code != switchboardv1.ErrorReason_ERROR_REASON_CHANNEL_INVALID {
		return fmt.Errorf("expected CHANNEL_INVALID, got %s", reason)
	}
	return nil
}

// reasonOf returns the reason of a Switchboard refusal: the ErrorInfo detail of domain
// "switchboard" in the status.
func reasonOf(err error) (string, bool) {
	st, ok := status.FromError(err)
	if !ok || err == nil {
		return "", false
	}
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok && info.Domain == "switchboard" {
			return info.Reason, true
		}
	}
	return "", false
}

// describe adds the reason to an error's text, when it has one.
func describe(err error) error {
	if reason, ok := reasonOf(err); ok {
		return fmt.Errorf("%w [%s]", err, reason)
	}
	return err
}
