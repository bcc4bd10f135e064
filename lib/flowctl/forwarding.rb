# frozen_string_literal: true

module Flowctl
  # A stream handed straight to another call is forwarded as bytes:
  #
  #   events = source.stream_events(request)          # an Enumerator: no call yet
  #   consumer.consume(processor.process(events))     # each event goes through as bytes
  #
  # The Enumerators that a client's server streaming and bidi methods return without a block
  # carry how to start their call (a Forwarding::Source, kept in an instance variable: the
  # Enumerator itself is the one enum_for gives, so next, peek, lazy, with_index and size
  # behave as they always did). When a client streaming or bidi call is given such an
  # Enumerator as its requests, and its replies are the call's request class (the same class
  # object), the call starts the source's call itself and Flowctl::Native::Stream#forward
  # (ext/flowctl/forward.c) moves each message's bytes from one call to the other without
  # the GVL; each message is checked against the class as the decoder would check it
  # (ext/flowctl/skim.c), so bytes that would not decode raise the same Flowctl::DecodeError.
  # The end of the source half-closes the destination; a source that fails cancels the
  # destination and its RPCError is raised; a destination that ends first cancels the source.
  #
  # Anything else takes the path of every Enumerable (each request decoded, then encoded):
  # other Enumerables (lazy, with_index, an Array, ...), differing classes, a client with
  # interceptors on either end (they may look at or swap messages), a Fiber scheduler.
  module Forwarding
    IVAR = :@flowctl_forward
    private_constant :IVAR

    # How to start a call whose replies may be forwarded; requests: the bidi call's own
    # requests (nil for a server streaming call, whose one request is bytes).
    Source = Struct.new(:client_channel, :rpc, :bytes, :requests, :timeout, :headers) do
      # Starts the call, yields its Native::Stream and call object; cancels the call if it
      # is left unfinished. A bidi call's requests are written by a writer thread, as
      # BidiCall#run writes them (forwarded in turn when they can be).
      def open
        if bytes
          call = ServerStreamCall.new(rpc, Native::Stream.new(client_channel, rpc.path, timeout, headers, bytes))
          yield call.__send__(:native_stream), call
        else
          call = BidiCall.new(rpc, Native::Stream.new(client_channel, rpc.path, timeout, headers))
          call.__send__(:with_writer, requests) { yield call.__send__(:native_stream), call }
        end
      ensure
        call.cancel if call && !call.finished?
      end
    end

    module_function

    # The Enumerator, marked as one whose call can be forwarded.
    def mark(enum, source)
      enum.instance_variable_set(IVAR, source)
      enum
    end

    # The Source of requests when they can be forwarded to a call taking klass, else nil.
    def source_for(requests, klass)
      return nil unless requests.instance_of?(Enumerator)

      source = requests.instance_variable_get(IVAR)
      return nil unless source && source.rpc.response_class.equal?(klass)
      return nil if FiberCalls.scheduled?

      source
    end
  end
end
